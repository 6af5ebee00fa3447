"""The OT map g: prior noise x_T → a point x_M among the targets (DPM-OT's first jump).

With the fitted potential h, the Brenier map sends x to the target of its cell,

.. math::
    g(x) = y_{i^*}, \\qquad i^* = \\arg\\max_i \\langle x, y_i \\rangle + h_i,

computed by the same sharded exact search as the fit
(:class:`dpmot_dist.pipelines.shards.ShardPool`).

- ``copy`` returns y_{i*} (the reference implementation).
- ``interp`` (AE-OT, An et al. 2020): among the top-k cells of x, keep the neighbours j whose
  supporting-plane normals n_j = (y_j, −1)/‖(y_j, −1)‖ make an angle below ``angle`` with the
  winner's, i.e. cells on the same side of no singularity of the Brenier potential; return
  (1 − w) y_{i*} + w y_j for one such j chosen at random, w ~ U(0, w_max). A sample with no
  admissible neighbour falls back to ``copy``.

Every random choice comes from the sample's own streams (seed, sample_id, ·), so the plan of
a sample does not depend on the batch or the number of shards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from dpmot_dist.diffusion.samplers import STREAM_MAP, prior_points, uniforms
from dpmot_dist.io import datasets
from dpmot_dist.ot.sources import Source

log = logging.getLogger(__name__)

MapKind = Literal["copy", "interp"]
MASKED = -1e30  # h of the targets a sample may not map to (below every score ⟨x, y⟩ + h)
_GATHER_BYTES = 64 << 20  # largest contiguous span of target rows read at once


class Searcher(Protocol):
    """What the map needs from a search (:class:`~dpmot_dist.pipelines.shards.ShardPool`)."""

    n: int
    dim: int

    def search(self, x, h: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class MapPlan:
    """Where the map sends each sample (all arrays of length B).

    ot_index: the winner i* (int64). partner: the interp neighbour j, −1 for a copy (int64).
    weight: w of x_M = (1 − w) y_{i*} + w y_j, 0 for a copy (float32).
    """

    ot_index: np.ndarray
    partner: np.ndarray
    weight: np.ndarray

    @staticmethod
    def concat(plans: list[MapPlan]) -> MapPlan:
        return MapPlan(
            np.concatenate([p.ot_index for p in plans]),
            np.concatenate([p.partner for p in plans]),
            np.concatenate([p.weight for p in plans]),
        )

    def take(self, order: np.ndarray) -> MapPlan:
        """The plan of the samples ``order`` (indices into this plan), in that order."""
        return MapPlan(self.ot_index[order], self.partner[order], self.weight[order])

    def needed(self) -> np.ndarray:
        """Sorted unique target indices the plan reads."""
        return np.unique(np.concatenate([self.ot_index, self.partner[self.partner >= 0]]))


@dataclass(frozen=True)
class TargetRows:
    """Some target rows: sorted unique global ``index`` (U,) and their ``rows`` (U, D)."""

    index: np.ndarray
    rows: np.ndarray

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the global indices ``idx`` (any shape) → (*idx.shape, D)."""
        pos = np.searchsorted(self.index, idx)
        assert np.array_equal(self.index[np.minimum(pos, len(self.index) - 1)], idx)
        return self.rows[pos]

    @classmethod
    def gather(cls, targets_uri: str, indices: np.ndarray) -> TargetRows:
        """Read the rows ``indices`` of a targets data set (or .npy) in contiguous spans.

        Each span starts at a needed row and covers at most ~64 MiB, so the targets are read
        at most once, and only near the rows needed.
        """
        index = np.unique(np.asarray(indices, np.int64))
        _, dim = datasets.targets_shape(targets_uri)
        span = max(1, _GATHER_BYTES // (4 * dim))
        rows = np.empty((len(index), dim), np.float32)
        i = 0
        while i < len(index):
            lo = int(index[i])
            j = int(np.searchsorted(index, lo + span))
            block = datasets.load_targets(targets_uri, lo, int(index[j - 1]) + 1)
            rows[i:j] = block[index[i:j] - lo]
            i = j
        return cls(index, rows)


def normal_cosines(y_win: np.ndarray, y_nb: np.ndarray) -> np.ndarray:
    """cos ∠(n_i, n_j) of the normals n = (y, −1)/‖(y, −1)‖: y_win (B, D), y_nb (B, m, D).

    cos = (⟨y_i, y_j⟩ + 1) / (sqrt(‖y_i‖² + 1) sqrt(‖y_j‖² + 1)); returns (B, m) float64.
    """
    y_win, y_nb = y_win.astype(np.float64), y_nb.astype(np.float64)
    dot = np.einsum("bd,bmd->bm", y_win, y_nb) + 1.0
    n_win = np.sqrt((y_win * y_win).sum(-1) + 1.0)
    n_nb = np.sqrt((y_nb * y_nb).sum(-1) + 1.0)
    return dot / (n_win[:, None] * n_nb)


def choose_partners(
    cos: np.ndarray,
    neighbours: np.ndarray,
    angle: float,
    u_pick: np.ndarray,
    u_weight: np.ndarray,
    w_max: float,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, a uniformly chosen admissible neighbour (cos ≥ cos(angle°)) and its weight.

    cos, neighbours: (B, m); u_pick, u_weight: (B,) uniforms. Returns (partner (B,) int64,
    −1 where none is admissible; weight (B,) float32, 0 there).
    """
    ok = (cos >= math.cos(math.radians(angle))) & (neighbours >= 0)
    count = ok.sum(1)
    pick = np.minimum((u_pick * count).astype(np.int64), np.maximum(count - 1, 0))
    col = (np.cumsum(ok, 1) > pick[:, None]).argmax(1)
    has = count > 0
    partner = np.where(has, neighbours[np.arange(len(col)), col], -1).astype(np.int64)
    weight = np.where(has, w_max * u_weight, 0.0).astype(np.float32)
    return partner, weight


def plan_map(
    search: Searcher,
    h: np.ndarray,
    sample_ids: np.ndarray,
    seed: int,
    *,
    mode: MapKind = "copy",
    k: int = 8,
    angle: float = 30.0,
    w_max: float = 0.5,
    source: Source | None = None,
    targets_uri: str | None = None,
    batch: int = 4096,
    cells: np.ndarray | None = None,
) -> tuple[MapPlan, TargetRows | None]:
    """Map the prior noise of ``sample_ids`` through g (``copy`` or ``interp``).

    ``interp`` reads the top-k candidates' rows from ``targets_uri`` to compare normals and
    returns them too (a superset of the rows :func:`mapped_points` needs). ``cells`` (N,)
    bool: the targets the map may reach (h is :data:`MASKED` on the others), so that no
    interp partner is taken from outside them.
    """
    source = source or Source()
    sample_ids = np.asarray(sample_ids, np.int64)
    k = 1 if mode == "copy" else min(k, search.n)
    parts = []
    for a in range(0, len(sample_ids), batch):
        x = prior_points(source, seed, sample_ids[a : a + batch], search.dim)
        parts.append(search.search(x, h, k)[1])
    top = np.concatenate(parts) if parts else np.empty((0, k), np.int64)
    if mode == "copy" or k < 2:
        none = np.full(len(top), -1, np.int64)
        return MapPlan(top[:, 0].copy(), none, np.zeros(len(top), np.float32)), None
    if targets_uri is None:
        raise ValueError("the interp map needs targets_uri to read the candidates' rows")
    neighbours = top[:, 1:] if cells is None else np.where(cells[top[:, 1:]], top[:, 1:], -1)
    reachable = np.where(neighbours >= 0, neighbours, top[:, :1])
    rows = TargetRows.gather(targets_uri, np.concatenate([top[:, 0], reachable.ravel()]))
    cos = normal_cosines(rows.take(top[:, 0]), rows.take(reachable))
    u = uniforms(seed, STREAM_MAP, sample_ids, 2)
    partner, weight = choose_partners(cos, neighbours, angle, u[:, 0], u[:, 1], w_max)
    return MapPlan(top[:, 0].copy(), partner, weight), rows


def mapped_points(plan: MapPlan, rows: TargetRows) -> np.ndarray:
    """x_M (B, D) float32: y_{i*}, or (1 − w) y_{i*} + w y_j where the plan has a partner."""
    x = rows.take(plan.ot_index).astype(np.float32)
    mixed = plan.partner >= 0
    if mixed.any():
        w = plan.weight[mixed, None]
        x[mixed] = (1 - w) * x[mixed] + w * rows.take(plan.partner[mixed])
    return x
