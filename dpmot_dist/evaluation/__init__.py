"""How good the samples are: FID, mode mixture, memorisation, label fidelity.

:func:`~dpmot_dist.evaluation.evaluate.run_eval` is the ``dpmot eval`` job (features on Ray
actors); :mod:`~dpmot_dist.evaluation.metrics` holds the measures as plain functions of
arrays (Fréchet distance, MMD, sliced W2, Gaussian-mixture mode metrics, nearest-target
distances) and :mod:`~dpmot_dist.evaluation.inception` the FID Inception-v3 network.
"""

from dpmot_dist.evaluation.evaluate import EvalConfig, run_eval
from dpmot_dist.evaluation.metrics import fid_from_features, frechet_distance

__all__ = ["EvalConfig", "fid_from_features", "frechet_distance", "run_eval"]
