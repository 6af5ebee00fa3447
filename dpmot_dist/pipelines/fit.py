"""The ``fit`` pipeline: targets → Brenier potential h, on one process or K Ray shard actors.

Output folder (any fsspec URI): ``h.npy`` (N values, target order), ``metrics.jsonl`` (one
object per logged iteration), ``_manifest.json``, ``_checkpoints/latest.npz`` (the whole
solver state, written atomically every ``checkpoint_every`` iterations), ``_workers.json``
(the shard actors' process ids) and ``_SUCCESS`` when done. ``--resume`` continues from the
checkpoint (also from a folder of the earlier layout, ``checkpoints/latest.npz``); since the
noise of iteration t is a function of (seed, t), an interrupted then resumed fit ends with
the same h as an uninterrupted one.

``--by-label`` fits one potential per class of labelled targets instead, in parallel
(:mod:`dpmot_dist.pipelines.label_fit`): ``h.npy`` still holds N values in target order, and
``_labels.json`` each class's summary.

One fit at a time writes a folder: the run holds the folder's lease
(:class:`~dpmot_dist.io.lease.OutputLease`, ``_lease/``) from before it touches the folder
until its outputs are written, and checks it before each checkpoint; a second fit or
``--resume`` of the same folder refuses while the lease is live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from dpmot_dist import __version__
from dpmot_dist.config import Config
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.io.lease import OutputLease
from dpmot_dist.ot.calibrate import calibrate, candidate_sources
from dpmot_dist.ot.solver import SDOTResult, SDOTSolver, SolverState, uniform_weights
from dpmot_dist.ot.sources import LATTICE_RANK, Source, default_source
from dpmot_dist.pipelines.label_fit import LABELS_FILE, run_label_fits
from dpmot_dist.pipelines.shards import ShardPool, default_shard_memory, shards_for_memory
from dpmot_dist.runtime import ensure_ray

log = logging.getLogger(__name__)

# Solver fields that FitConfig names itself: ``iters`` caps the run, ``eval_samples`` has a
# default that depends on N.
_OWN_FIELDS = frozenset({"max_iters", "eval_samples"})
SOLVER_FIELDS = tuple(f.name for f in dataclasses.fields(SDOTSolver) if f.name not in _OWN_FIELDS)


class FitConfig(Config):
    """Options of ``dpmot fit`` (config-file keys are the field names).

    The solver's hyper-parameters are :class:`~dpmot_dist.ot.solver.SDOTSolver` itself
    (``solver``); files and flags give them as flat keys (``lr: 0.1``, ``--patience 50``).
    """

    FLAT: ClassVar[dict[str, tuple[str, ...]]] = {"solver": SOLVER_FIELDS}
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("targets", "weights"),
        "source": ("source", "qmc", "lattice", "lattice_rank", "calibrate", "seed"),
        "solver": ("iters", "eval_samples", "solver"),
        "cluster": (
            "workers",
            "replicas",
            "shards",
            "shard_memory",
            "placement",
            "cpus_per_worker",
            "backend",
            "storage_dtype",
            "device",
            "chunk",
        ),
        "output": ("out", "by_label", "resume", "overwrite", "checkpoint_every"),
    }

    targets: str = Field(description="targets: a .npy (N×D) or a targets data set folder")
    out: str = Field(description="output folder URI")
    weights: str | None = Field(None, description=".npy of N non-negative target weights")
    source: Literal["gaussian", "uniform"] = Field("gaussian", description="source measure μ")
    qmc: bool | None = Field(
        None,
        description="scrambled Sobol source points (default: on for D ≤ 16, where randomised "
        "QMC beats Monte Carlo, off above)",
    )
    lattice: int | None = Field(
        None,
        ge=0,
        description="points per random subspace of the lattice source (Gaussian source; "
        "default: 64 for D ≥ 3 unless --qmc; 0: independent points)",
    )
    lattice_rank: int = Field(LATTICE_RANK, ge=2, le=3, description="lattice subspace dimension")
    calibrate: Literal["auto", "off"] = Field(
        "auto",
        description="auto: unless --qmc or --lattice is given, pick the source (independent, "
        "Sobol or lattice points) by seconds × variance per projection measured on the "
        "targets at the start (recorded in the manifest); off: the fixed defaults",
    )
    seed: int = Field(0, description="seed of every source stream")
    iters: int = Field(1000, ge=0, description="iteration cap")
    eval_samples: int | None = Field(
        None, ge=0, description="fresh evaluation sample size (default: 64·N in [2^16, 2^24])"
    )
    solver: SDOTSolver = Field(default_factory=SDOTSolver, description="solver options")
    workers: int = Field(0, ge=0, description="Ray shard actors, one group (0: in process)")
    replicas: int | None = Field(
        None, ge=1, description="replica groups R, each a disjoint share of every iteration"
    )
    shards: int | Literal["auto"] | None = Field(
        None,
        description="shard actors G per group, each holding N/G targets; auto: the fewest "
        "that fit --shard-memory (default: --workers, or 1 with --replicas)",
    )
    shard_memory: float | None = Field(
        None,
        gt=0,
        description="bytes of targets per shard actor for --shards auto (default: 70%% of "
        "the GPU's memory; on CPU half the RAM over the actors)",
    )
    placement: Literal["default", "spread"] = Field(
        "default",
        description="spread: the actors over as many nodes as can take them (Ray's SPREAD; an "
        "actor whose node dies restarts on another)",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per shard actor")
    backend: str = Field("auto", description="search backend: auto, faiss, torch, triton")
    storage_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the targets' copy the candidate search reads"
    )
    device: str = Field("auto", description="auto, cpu or cuda")
    chunk: int = Field(4096, ge=1, description="source samples per search call")
    resume: bool = Field(False, description="continue from the output's checkpoint")
    overwrite: bool = Field(False, description="replace an existing output")
    checkpoint_every: int = Field(50, ge=1, description="iterations between checkpoints")
    by_label: bool = Field(
        False,
        description="one potential per label: independent SDOT problems over each class's "
        "targets, in parallel on the workers",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_solver_keys(cls, values: Any) -> Any:
        """Gather the flat solver keys (``lr``, ``patience``, ...) into ``solver``."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        solver = values.pop("solver", None) or {}
        if isinstance(solver, SDOTSolver):
            solver = {name: getattr(solver, name) for name in SOLVER_FIELDS}
        solver = dict(solver)
        for name in SOLVER_FIELDS:
            if name in values:
                solver[name] = values.pop(name)
        values["solver"] = solver
        return values

    def make_solver(self, n: int) -> SDOTSolver:
        """The solver these options describe, for N targets."""
        eval_samples = self.eval_samples
        if eval_samples is None:
            eval_samples = int(min(max(64 * n, 1 << 16), 1 << 24))
        return dataclasses.replace(self.solver, max_iters=self.iters, eval_samples=eval_samples)


class Progress:
    """A progress bar on a terminal, one log line every ``every`` iterations otherwise."""

    def __init__(self, total: int, start: int, every: int) -> None:
        self.every, self.bar = every, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", desc="fit")

    def update(self, r: dict) -> None:
        rate = r["batch"] / max(r.get("t_iter", 0.0), 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                energy=f"{r['energy']:.5g}", tv=f"{r['tv']:.4f}", samples_s=f"{rate:.3g}"
            )
        elif r["iter"] % self.every == 0 or r["iter"] == 1:
            log.info(
                "iter %d  energy %.6g  tv %.4f  |g| %.3g  empty %.3f  batch %d  %.3g samples/s",
                r["iter"],
                r["energy"],
                r["tv"],
                r["grad_l2"],
                r["empty_frac"],
                r["batch"],
                rate,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_metrics(out: str, metrics: list[dict]) -> None:
    """``metrics.jsonl``: one JSON object per logged iteration (rewritten atomically)."""
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    storage.write_bytes_atomic(storage.join(out, "metrics.jsonl"), text.encode())


def load_state(cfg: FitConfig) -> SolverState | None:
    """The checkpointed solver state when resuming (None: start afresh)."""
    ckpt = datasets.find_aux(cfg.out, datasets.CHECKPOINT) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            log.warning("%s: no checkpoint; starting from h = 0", cfg.out)
        return None
    state = SolverState.from_bytes(storage.read_bytes(ckpt))
    log.info("resuming from iteration %d (%s)", state.iteration, ckpt)
    return state


def fit_source(cfg: FitConfig, dim: int) -> Source:
    """The source measure of the fit (:func:`~dpmot_dist.ot.sources.default_source`)."""
    try:
        return default_source(cfg.source, dim, cfg.qmc, cfg.lattice, cfg.lattice_rank)
    except ValueError as e:
        raise DpmotError(f"{cfg.targets}: {e}") from None


def run_fit(cfg: FitConfig) -> SDOTResult | None:
    """Fit h for ``cfg`` and write the output folder; returns the solver's result.

    Returns None when ``--resume`` finds the output already complete.
    """
    n, dim = datasets.targets_shape(cfg.targets)
    nu = datasets.load_weights(cfg.weights, n) if cfg.weights else uniform_weights(n)
    if cfg.resume and storage.is_success(cfg.out):
        log.info("%s is complete (_SUCCESS present); nothing to do", cfg.out)
        return None
    source = fit_source(cfg, dim)  # bad source options fail before anything is written
    replicas, shards = fit_layout(cfg, n, dim)
    with OutputLease(cfg.out) as lease:
        if cfg.by_label:
            result, classes = run_label_fits(cfg, source)
            storage.write_json_atomic(storage.join(cfg.out, LABELS_FILE), {"labels": classes})
            extra = {"by_label": True, "classes": len(classes), "labels_file": LABELS_FILE}
            _write_outputs(cfg, result, n, dim, source, lease, extra=extra)
            return result
        storage.prepare_output(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
        result, used, calibration = _fit_holding(cfg, lease, nu, n, dim, source, replicas, shards)
        _write_outputs(cfg, result, n, dim, used, lease, calibration=calibration)
    return result


def _fit_holding(
    cfg: FitConfig,
    lease: OutputLease,
    nu: np.ndarray,
    n: int,
    dim: int,
    source: Source,
    replicas: int,
    shards: int,
) -> tuple[SDOTResult, Source, dict]:
    """The fit itself (shard pool, source, solver, checkpoints), run while holding the
    output's lease; returns the result, the source that ran and its calibration."""
    state = load_state(cfg)
    if replicas * shards > 0:
        ensure_ray()
    pool = ShardPool.create(
        cfg.targets,
        replicas=replicas or None,
        shards=shards,
        backend=cfg.backend,
        storage_dtype=cfg.storage_dtype,
        device=cfg.device,
        source=source,
        seed=cfg.seed,
        chunk=cfg.chunk,
        cpus_per_worker=cfg.cpus_per_worker,
        placement=cfg.placement,
    )
    try:
        storage.write_json_atomic(storage.join(cfg.out, datasets.WORKERS), pool.layout())
        calibration = choose_source(cfg, pool, state, n, dim)
        result = _solve(cfg, pool, nu, state, n, calibration, lease)
        return result, pool.source, calibration
    finally:
        pool.close()


def fit_layout(cfg: FitConfig, n: int, dim: int) -> tuple[int, int]:
    """(R, G) of the fit: (0, 0) in process; ``--workers K`` alone is (1, K)."""
    if cfg.replicas is None and cfg.shards is None:
        return (1, cfg.workers) if cfg.workers else (0, 0)
    replicas = cfg.replicas or 1
    shards = cfg.shards if cfg.shards is not None else (cfg.workers or 1)
    if shards == "auto":
        budget = cfg.shard_memory or default_shard_memory(cfg.device, replicas)
        shards = shards_for_memory(n, dim, cfg.storage_dtype, budget)
        log.info("--shards auto: %d shard(s) of %d targets each", shards, math.ceil(n / shards))
    if shards > n:
        raise DpmotError(f"{cfg.targets}: {shards} shards for only {n} targets")
    return replicas, int(shards)


def choose_source(cfg: FitConfig, pool: ShardPool, state, n: int, dim: int) -> dict:
    """The source of the fit: a resumed fit's, the options', or the calibration's pick."""
    if state is not None and state.source:
        pool.set_source(Source(**state.source))
        return state.calibration
    if cfg.calibrate == "off" or cfg.qmc is not None or cfg.lattice is not None:
        return {}
    candidates = candidate_sources(cfg.source, dim)
    if len(candidates) < 2:
        return {}
    projections = max(8 * min(cfg.chunk, 4096), 4 * n)
    uses_cv = cfg.make_solver(n).uses_control_variate
    return calibrate(pool, candidates, np.zeros(n), projections, control_variate=uses_cv)


def _solve(
    cfg: FitConfig,
    pool: ShardPool,
    nu: np.ndarray,
    state: SolverState | None,
    n: int,
    calibration: dict,
    lease: OutputLease,
) -> SDOTResult:
    solver = cfg.make_solver(n)
    if state is None:
        state = solver.init_state(pool)
        state.source, state.calibration = asdict(pool.source), calibration
    progress = Progress(cfg.iters, state.iteration if state else 0, solver.log_every)
    last = [time.perf_counter(), time.process_time()]

    def on_iteration(s: SolverState, record: dict) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        record["t_iter"], last[0] = now - last[0], now
        record["t_driver_cpu"], last[1] = cpu - last[1], cpu  # the driver process's CPU
        progress.update(record)
        if s.iteration % cfg.checkpoint_every == 0:
            lease.check()
            checkpoint(cfg.out, s)

    try:
        result = solver.solve(pool, nu, state, on_iteration)
    finally:
        progress.close()
    ev = result.evaluation
    if ev:
        log.info(
            "stopped: %s after %d iterations; fresh-sample evaluation (%d samples, noise floor "
            "%.4f%s): tv %.4f  worst cell %d %+.1f%%  empty %.4f",
            result.stop_reason,
            result.iterations,
            ev["samples"],
            ev["tv_noise_floor"],
            ", TV is an upper bound" if ev["tv_upper_bound"] else "",
            ev["tv"],
            ev["worst_cell"],
            100 * ev["worst_cell_mass"] / ev["worst_cell_target"] - 100,
            ev["empty_frac"],
        )
        warn_worst_cell(cfg.targets, ev)
    return result


def warn_worst_cell(targets: str, ev: dict, limit: float = 0.1) -> None:
    """One warning line when the final evaluation shows a cell more than ``limit`` off its
    target mass (and its own noise cannot explain it: beyond 4 standard deviations)."""
    rel = ev["max_rel_err"]
    if rel > limit and rel > 4 * ev["worst_cell_noise"]:
        log.warning(
            "%s: cell %d (target mass %.3g) ends %+.1f%% off (mass %.3g): that mode will be "
            "sampled that much too often or too rarely; fit longer or pass --tol-rel-err",
            targets,
            ev["worst_cell"],
            ev["worst_cell_target"],
            100 * (ev["worst_cell_mass"] / ev["worst_cell_target"] - 1),
            ev["worst_cell_mass"],
        )
    elif 4 * ev["worst_cell_noise"] > limit:
        log.info(
            "the evaluation's %d samples resolve each cell's mass to ±%.0f%% only",
            ev["samples"],
            400 * ev["worst_cell_noise"],
        )


def with_evaluation(result: SDOTResult) -> list[dict]:
    """The metrics records, the last one (the final iteration) carrying the final fresh-sample
    evaluation under ``"evaluation"`` (TV, worst cell and its masses, sample size, floor)."""
    records = [dict(r) for r in result.metrics]
    if result.evaluation and records:
        records[-1]["evaluation"] = {**result.evaluation, "stop_reason": result.stop_reason}
    return records


def checkpoint(out: str, state: SolverState) -> None:
    """Write the solver state and the metrics so far, each atomically."""
    storage.write_bytes_atomic(storage.join(out, datasets.CHECKPOINT), state.to_bytes())
    write_metrics(out, state.metrics)


def _write_outputs(
    cfg: FitConfig,
    result: SDOTResult,
    n: int,
    dim: int,
    source: Source,
    lease: OutputLease,
    calibration: dict | None = None,
    extra: dict | None = None,
) -> None:
    lease.check()
    storage.save_npy(storage.join(cfg.out, "h.npy"), result.h)
    write_metrics(cfg.out, with_evaluation(result))
    manifest = {
        "kind": "potential",
        "version": 1,
        "dpmot_dist": __version__,
        "n": n,
        "dim": dim,
        "targets": cfg.targets,
        "weights": cfg.weights,
        "source": cfg.source,
        "qmc": source.qmc,
        "lattice": source.lattice,
        "lattice_rank": source.lattice_rank,
        "seed": cfg.seed,
        "iterations": result.iterations,
        "samples": result.samples,
        "converged": result.converged,
        "stop_reason": result.stop_reason,
        "calibration": calibration or {},
        "evaluation": result.evaluation,
        "config": cfg.model_dump(),
    }
    with_schedule = _targets_schedule(cfg.targets)
    manifest.update(with_schedule)
    manifest.update(extra or {})
    storage.write_json_atomic(storage.join(cfg.out, datasets.MANIFEST), manifest)
    storage.mark_success(cfg.out)


def _targets_schedule(targets: str) -> dict:
    """The schedule and step of a targets data set (nothing for a plain .npy)."""
    if targets.endswith(".npy"):
        return {}
    m = datasets.read_targets_manifest(targets)
    return {k: m[k] for k in ("schedule", "step", "data_shape") if k in m}
