"""The math of semi-discrete optimal transport, with no I/O and no cluster.

Given targets y_1..y_N with weights ν and a source measure μ (the Gaussian diffusion prior),
the layer finds the Brenier potential h whose cells W_i(h) = {x : i = argmax ⟨x, y⟩ + h} carry
masses μ(W_i) = ν_i: :mod:`~dpmot_dist.ot.search` maximises ⟨x, y_i⟩ + h_i over the targets
exactly on every backend (FAISS, tiled torch, the fused Triton kernels of ``kernels/``),
:mod:`~dpmot_dist.ot.sources` draws reproducible source batches (independent points, Sobol,
lattice points), :mod:`~dpmot_dist.ot.assign` turns a batch into cell statistics,
:mod:`~dpmot_dist.ot.solver` optimises h, and :mod:`~dpmot_dist.ot.exact` gives closed-form
cell masses to check all of it against.
"""

from dpmot_dist.ot.assign import Assigner, Assignment, LocalAssigner, StreamAssigner
from dpmot_dist.ot.search import TargetIndex, merge_topk, search
from dpmot_dist.ot.solver import SDOTResult, SDOTSolver, SolverState, uniform_weights
from dpmot_dist.ot.sources import Lattice, Source, default_source, stream_seed

__all__ = [
    "Assigner",
    "Assignment",
    "Lattice",
    "LocalAssigner",
    "SDOTResult",
    "SDOTSolver",
    "SolverState",
    "Source",
    "StreamAssigner",
    "TargetIndex",
    "default_source",
    "merge_topk",
    "search",
    "stream_seed",
    "uniform_weights",
]
