r"""Pick the source by what it buys per second: a short calibration on the actual targets.

Every source of :mod:`dpmot_dist.ot.sources` estimates the cell masses without bias; they
differ in the variance per projection (lattice points spread one subspace's points over many
cells) and in the seconds per projection on this backend (a lattice point costs 2m + 1 flops
per target besides its subspace's projections). The solver's progress per second at a given
accuracy is set by their product: the seconds a source needs to bring the variance of the
cell-mass estimate down to a given level,

.. math::
    \text{cost} = \underbrace{t / P}_{\text{seconds per projection}}
    \times \underbrace{P \sum_i \widehat{\operatorname{Var}}(\hat\mu_i)}_{\text{variance per
    projection}},

where the variance is measured between ``groups`` independent batches of P projections each
at the calibration potential h, and the seconds are those of the statistics the fit will ask
for: with the snapshot control variate on (``control_variate(source)``), the winners under h
and the snapshot together. The candidate with the lowest cost wins.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from dpmot_dist.ot.assign import Assigner
from dpmot_dist.ot.sources import Source

log = logging.getLogger(__name__)

CALIBRATION_STREAM = 3  # stream key of the calibration batches (after train, eval, probe)


def candidate_sources(kind: str, dim: int) -> dict[str, Source]:
    """The sources the calibration compares for ``kind`` in dimension ``dim``."""
    if kind == "uniform" or dim < 3:
        out = {"monte-carlo": Source(kind=kind)}
        if dim <= 21201:
            out["sobol"] = Source(kind=kind, qmc=True)
        return out
    out = {"monte-carlo": Source(kind=kind)}
    if dim <= 16:
        out["sobol"] = Source(kind=kind, qmc=True)
    for points in (64, 16, 8):
        out[f"lattice-{points}"] = Source(kind=kind, lattice=points, lattice_rank=3)
    return out


def calibrate(
    assigner: Assigner,
    candidates: dict[str, Source],
    h: np.ndarray,
    projections: int,
    groups: int = 8,
    control_variate=None,
) -> dict:
    """Seconds and cell-mass variance per projection of each candidate source at ``h``.

    ``assigner`` must have ``set_source`` (the local assigner and the shard pool have it); it
    is left on the chosen source. Each candidate first runs one small warm-up batch (kernels
    compile, caches fill), then ``groups`` timed batches of ``projections // groups``: the
    snapshot statistics (at h_s = h) where ``control_variate(source)`` says the fit will use
    them (e.g. :meth:`~dpmot_dist.ot.solver.SDOTSolver.uses_control_variate`), else plain
    statistics.

    Returns {"chosen": name, "candidates": {name: {"seconds_per_projection",
    "variance_per_projection", "cost"}}, "projections": per candidate}.
    """
    per = max(1, projections // groups)
    report = {}
    for name, source in candidates.items():
        assigner.set_source(source)
        if control_variate is not None and control_variate(source):

            def stats(key, samples):
                return assigner.assign_snapshot(h, h, key, samples)
        else:

            def stats(key, samples):
                return assigner.assign(h, key, samples)

        stats((CALIBRATION_STREAM, 0), min(per, 1024))
        t0 = time.perf_counter()
        masses, spent = [], 0
        for g in range(groups):
            a = stats((CALIBRATION_STREAM, 1 + g), per)
            masses.append(a.cell_mass())
            spent += a.projections
        seconds = (time.perf_counter() - t0) / spent
        variance = float(np.var(np.stack(masses), axis=0, ddof=1).sum()) * spent / groups
        report[name] = {
            "seconds_per_projection": seconds,
            "variance_per_projection": variance,
            "cost": seconds * variance,
        }
    chosen = min(report, key=lambda name: report[name]["cost"])
    assigner.set_source(candidates[chosen])
    for name, r in report.items():
        log.info(
            "calibration: %-12s %.3g s/projection × variance %.3g per projection = %.3g%s",
            name,
            r["seconds_per_projection"],
            r["variance_per_projection"],
            r["cost"],
            "  (chosen)" if name == chosen else "",
        )
    return {"chosen": chosen, "candidates": report, "projections": per * groups}
