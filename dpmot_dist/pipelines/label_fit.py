"""``fit --by-label``: one potential per class, independent SDOT problems solved in parallel.

For labelled targets with classes c and index sets I_c = {i : label_i = c}, class c gets its own
semi-discrete problem between the source μ and the targets of I_c with weights
ν^{(c)}_i = ν_i / Σ_{j ∈ I_c} ν_j:

.. math::
    h^{(c)} = \\arg\\min_h \\int \\max_{i \\in I_c} (\\langle x, y_i \\rangle + h_i) \\, d\\mu(x)
              - \\sum_{i \\in I_c} \\nu^{(c)}_i h_i ,

so that the map g_c(x) = y_{argmax_{i ∈ I_c} ⟨x, y_i⟩ + h_i} sends all of μ into class c's
cells, each of mass ν^{(c)}_i (``sample --labels``). The output keeps the fit layout and
``h.npy``'s meaning, N values in target order: h_i = h^{(c)}_i for i ∈ I_c (each class's
potential centred on its own cells). ``metrics.jsonl`` holds every class's records with a
``label`` key, ``_labels.json`` each class's size, iterations, samples, convergence, seconds
and fresh-sample evaluation, and ``_manifest.json`` says ``by_label: true``.

Classes are dealt to K Ray actors (:class:`LabelFitWorker`, largest classes first, each to the
least loaded actor); an actor loads its classes' rows once and solves them one after the
other, so K classes are solved at a time. ``workers = 0`` solves them in this process. Each
worker uses ``cpus_per_worker`` threads: these problems are small.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
import warnings
from typing import Any

import numpy as np
import torch

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.ot.assign import LocalAssigner
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import SDOTResult, SDOTSolver, uniform_weights
from dpmot_dist.ot.sources import Source
from dpmot_dist.pipelines.ot_map import TargetRows
from dpmot_dist.runtime import ensure_ray, remote_error, resolve_device, set_threads

log = logging.getLogger(__name__)

LABELS_FILE = "_labels.json"


class LabelFitWorker:
    """Holds the rows of some classes; ``solve(label, solver, nu)`` fits that class's h.

    Runs as a Ray actor or in process.
    """

    def __init__(
        self,
        targets_uri: str,
        cells: dict[int, np.ndarray],
        *,
        backend: str = "auto",
        storage_dtype: str = "float32",
        device: str = "cpu",
        source: Source | None = None,
        seed: int = 0,
        chunk: int = 4096,
        threads: int | None = None,
    ) -> None:
        set_threads(threads)
        rows = TargetRows.gather(targets_uri, np.concatenate(list(cells.values())))
        self.rows = {c: rows.take(idx) for c, idx in cells.items()}
        self.backend, self.storage_dtype = backend, storage_dtype
        self.device, self.source, self.seed, self.chunk = (
            resolve_device(device),
            source,
            seed,
            chunk,
        )

    def pid(self) -> int:
        return os.getpid()

    def solve(self, label: int, solver: SDOTSolver, nu: np.ndarray) -> dict[str, Any]:
        """Class ``label``'s potential h (N_c,) in its rows' order, and how the solve went."""
        t0 = time.perf_counter()
        y = self.rows[label]
        if len(y) == 1:  # one cell holds all of μ: h = 0, nothing to solve
            result = SDOTResult(np.zeros(1), np.zeros(1), True, 0, 0, [])
        else:
            index = TargetIndex(
                y, backend=self.backend, storage_dtype=self.storage_dtype, device=self.device
            )
            assigner = LocalAssigner(index, self.source or Source(), self.seed, self.chunk)
            with warnings.catch_warnings():  # "stopped before the tolerance": in the summary
                warnings.simplefilter("ignore", RuntimeWarning)
                result = solver.solve(assigner, nu)
        return {
            "label": label,
            "h": result.h,
            "metrics": [{"label": label, **r} for r in result.metrics],
            "summary": {
                "n": len(y),
                "iterations": result.iterations,
                "samples": result.samples,
                "converged": result.converged,
                "seconds": time.perf_counter() - t0,
                "evaluation": result.evaluation,
            },
        }


def class_cells(labels: np.ndarray) -> dict[int, np.ndarray]:
    """I_c, the target indices of each class present: label → sorted indices."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return {int(c): idx for c, idx in zip(classes, np.split(order, starts[1:]), strict=True)}


def deal(sizes: dict[int, int], workers: int) -> list[list[int]]:
    """Classes dealt to ``workers`` groups: largest first, each to the least loaded group."""
    groups: list[list[int]] = [[] for _ in range(max(1, workers))]
    load = np.zeros(len(groups))
    for c in sorted(sizes, key=lambda c: (-sizes[c], c)):
        g = int(np.argmin(load))
        groups[g].append(c)
        load[g] += sizes[c]
    return [g for g in groups if g]


def class_weights(nu: np.ndarray, cells: dict[int, np.ndarray], uri: str) -> dict[int, float]:
    """ν(I_c), the mass of each class (a class of zero mass has no problem to solve)."""
    mass = {c: float(nu[idx].sum()) for c, idx in cells.items()}
    empty = [c for c, m in mass.items() if m <= 0]
    if empty:
        raise DpmotError(f"{uri}: the weights of class {empty[0]} sum to 0")
    return mass


def run_label_fits(cfg, source: Source) -> tuple[SDOTResult, dict[str, dict]]:
    """Fit one potential per class of ``cfg.targets`` (the output folder is made ready here;
    :func:`dpmot_dist.pipelines.fit.run_fit` writes it).

    ``cfg`` is a :class:`~dpmot_dist.pipelines.fit.FitConfig` with ``by_label``. Returns the
    classes' results combined (h (N,), every record, converged when all are, the evaluation
    of the per-class maps mixed by class mass: TV = Σ_c ν(I_c) TV_c) and each class's summary
    (label → n, iterations, samples, converged, seconds, evaluation).
    """
    n = datasets.targets_shape(cfg.targets)[0]
    labels = datasets.load_target_labels(cfg.targets)
    if labels is None:
        raise DpmotError(f"{cfg.targets}: --by-label needs labelled targets (prepare them so)")
    if cfg.resume:
        raise DpmotError(f"{cfg.out}: --resume is not supported with --by-label; rerun fit")
    nu = datasets.load_weights(cfg.weights, n) if cfg.weights else uniform_weights(n)
    cells = class_cells(labels)
    mass = class_weights(nu, cells, cfg.weights or cfg.targets)
    storage.prepare_output(cfg.out, overwrite=cfg.overwrite)
    log.info("fit by label: %d classes of %d targets on %d workers", len(cells), n, cfg.workers)
    t0 = time.perf_counter()
    jobs = {c: (cfg.make_solver(len(idx)), nu[idx] / mass[c]) for c, idx in cells.items()}
    results = _solve_all(cfg, source, cells, jobs)
    h = np.zeros(n)
    for c, r in results.items():
        h[cells[c]] = r["h"]
    log.info("fit by label: %d classes in %.1f s", len(cells), time.perf_counter() - t0)
    return _combined(h, results, mass), {str(c): results[c]["summary"] for c in sorted(results)}


def _solve_all(cfg, source: Source, cells: dict, jobs: dict) -> dict[int, dict]:
    """Every class's result, on ``cfg.workers`` actors (or in process)."""
    options = {
        "backend": cfg.backend,
        "storage_dtype": cfg.storage_dtype,
        "device": cfg.device,
        "source": source,
        "seed": cfg.seed,
        "chunk": cfg.chunk,
    }
    progress = _Progress(len(cells))
    threads = torch.get_num_threads()
    try:
        if not cfg.workers:  # one worker of cpus_per_worker threads, as an actor would be
            worker = LabelFitWorker(cfg.targets, cells, threads=_threads(cfg), **options)
            return {c: progress.update(worker.solve(c, *jobs[c])) for c in cells}
        return _solve_ray(cfg, cells, jobs, options, progress)
    finally:
        torch.set_num_threads(threads)
        progress.close()


def _threads(cfg) -> int:
    """Threads of one worker: ``cpus_per_worker`` (small problems run fastest on few: on 2
    loaded cores one class of 8 targets took 0.34 s on 1 thread, 9.9 s on 2)."""
    return max(1, int(cfg.cpus_per_worker))


def _solve_ray(cfg, cells: dict, jobs: dict, options: dict, progress) -> dict[int, dict]:
    import ray

    ensure_ray()
    groups = deal({c: len(idx) for c, idx in cells.items()}, cfg.workers)
    gpus = 1 if resolve_device(cfg.device) == "cuda" else 0
    resources = {"num_cpus": cfg.cpus_per_worker, "num_gpus": gpus}
    resources |= {"max_restarts": 1, "max_task_retries": 1}
    threads = _threads(cfg)
    tag = uuid.uuid4().hex[:8]
    handles = [
        ray.remote(LabelFitWorker)
        .options(name=f"dpmot-label-fit-{tag}-{k}", **resources)
        .remote(cfg.targets, {c: cells[c] for c in g}, threads=threads, **options)
        for k, g in enumerate(groups)
    ]
    try:
        pids = ray.get([a.pid.remote() for a in handles])
        storage.write_json_atomic(storage.join(cfg.out, datasets.WORKERS), {"pids": pids})
        pending = {
            a.solve.remote(c, *jobs[c]): c for a, g in zip(handles, groups, strict=True) for c in g
        }
        results = {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(ref)] = progress.update(ray.get(ref))
        return results
    except Exception as e:
        raise remote_error(e) from None
    finally:
        for a in handles:
            ray.kill(a)


class _Progress:
    """A progress bar over classes on a terminal, a log line every ~5% of them otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.every = max(1, total // 20)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="class", desc="fit by label")

    def update(self, result: dict) -> dict:
        self.done += 1
        s = result["summary"]
        if self.bar is not None:
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            log.info(
                "label %d (%d targets): %d iterations, TV %.4f, %.1f s (%d/%d classes)",
                result["label"],
                s["n"],
                s["iterations"],
                s["evaluation"].get("tv", float("nan")),
                s["seconds"],
                self.done,
                self.total,
            )
        return result

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _combined(h: np.ndarray, results: dict, mass: dict) -> SDOTResult:
    """The classes' results as one: records concatenated, evaluation mixed by class mass."""
    s = {c: r["summary"] for c, r in results.items()}
    exact = {"tv": 0.0, "max_rel_err": 0.0, "empty_frac": 0.0}  # a class of one target
    evaluation = {}
    if all(v["evaluation"] or v["n"] == 1 for v in s.values()):
        ev = {c: v["evaluation"] or exact for c, v in s.items()}
        evaluation = {
            "tv": sum(mass[c] * e["tv"] for c, e in ev.items()),
            "max_rel_err": max(e["max_rel_err"] for e in ev.values()),
            "empty_frac": sum(s[c]["n"] * e["empty_frac"] for c, e in ev.items()) / len(h),
            "tv_noise_floor": sum(mass[c] * e.get("tv_noise_floor", 0.0) for c, e in ev.items()),
            "samples": sum(e.get("samples", 0) for e in ev.values()),
        }
    return SDOTResult(
        h=h,
        h_last=h.copy(),
        converged=all(v["converged"] for v in s.values()),
        iterations=max(v["iterations"] for v in s.values()),
        samples=sum(v["samples"] for v in s.values()),
        metrics=[m for c in sorted(results) for m in results[c]["metrics"]],
        evaluation=evaluation,
    )
