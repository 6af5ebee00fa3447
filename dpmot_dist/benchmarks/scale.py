"""``dpmot bench scale``: the whole path at ImageNet's N on this machine, stage by stage.

N = 1,281,167 targets (ImageNet's training set) of a small dimension (default D = 16) drawn
from a clustered Gaussian mixture (1,000 components), so that it fits a laptop:

1. ``prepare`` the .npy to Parquet targets (``--uri``: local by default, any fsspec URI);
2. ``fit`` ≥ 5 iterations on local Ray, 2 replicas × 2 shards, a batch of 65,536 projections,
   checkpointing at the end;
3. ``fit --resume`` for 2 more iterations;
4. ``sample --num 50000`` with the mixture's exact score (``gmm:``), on Ray workers;
5. read the samples back (50,000 distinct sample ids).

For each stage it reports the wall seconds, the driver's peak RSS during it (sampled), and
the stage's own figures: bytes into the driver per fit iteration, the checkpoint's size,
rows written. ``--json`` prints one object with a ``stages`` list.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpmot_dist.benchmarks.prepare import RssSampler, peak_rss_bytes
from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.io import datasets, storage

IMAGENET_N = 1_281_167
_ROWS_PER_WRITE = 1 << 18


def write_mixture_data(path: Path, n: int, dim: int, components: int, seed: int) -> GaussianMixture:
    """Stream n draws of a clustered mixture (means ~ N(0, I), spread 0.1) to ``path`` (.npy);
    returns the mixture (its exact score is the sampler's model)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, dim))
    mixture = GaussianMixture(means, np.full(components, 0.1), np.full(components, 1 / components))
    header = {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (n, dim)}
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, n, _ROWS_PER_WRITE):
            f.write(
                mixture.sample(min(_ROWS_PER_WRITE, n - a), gen)
                .numpy()
                .astype(np.float32)
                .tobytes()
            )
    return mixture


class Stage:
    """Times a stage and samples the driver's RSS during it."""

    def __init__(self, name: str, report: list) -> None:
        self.name, self.report, self.record = name, report, {"name": name}

    def __enter__(self) -> dict:
        self.sampler = RssSampler()
        self.sampler.__enter__()
        self.t0 = time.perf_counter()
        return self.record

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.t0
        self.sampler.__exit__(*exc)
        self.record.update(
            seconds=seconds,
            driver_peak_rss_bytes=max(self.sampler.peak, 0) or peak_rss_bytes(),
            driver_lifetime_peak_rss_bytes=peak_rss_bytes(),
        )
        self.report.append(self.record)
        print(
            f"{self.name:8s} {seconds:8.1f} s  driver peak RSS "
            f"{self.record['driver_peak_rss_bytes'] / 2**30:.2f} GiB  "
            + "  ".join(f"{k} {v}" for k, v in self.record.items() if k not in _SHOWN),
            flush=True,
        )


_SHOWN = {"name", "seconds", "driver_peak_rss_bytes", "driver_lifetime_peak_rss_bytes"}


def _metrics(out: str) -> list[dict]:
    text = storage.read_bytes(storage.join(out, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def run(args: argparse.Namespace) -> dict:
    from dpmot_dist.pipelines.fit import FitConfig, run_fit
    from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
    from dpmot_dist.pipelines.sample import SampleConfig, run_sample
    from dpmot_dist.runtime import ensure_ray

    stages: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="dpmot-bench-scale-"))
    root = args.uri.rstrip("/") if args.uri else str(tmp)
    try:
        data = tmp / "x0.npy"
        mixture = write_mixture_data(data, args.n, args.dim, args.components, args.seed)
        model = tmp / "gmm.npz"
        mixture.save(str(model))
        ensure_ray()
        targets, fit_out, samples = (storage.join(root, k) for k in ("targets", "fit", "samples"))
        with Stage("prepare", stages) as r:
            m = run_prepare(
                PrepareConfig(
                    data=str(data), out=targets, step=args.step, workers=2, overwrite=True
                )
            )
            r.update(rows_written=m["n"], parts=len(m["parts"]))
        fit = {
            "targets": targets,
            "out": fit_out,
            "replicas": 2,
            "shards": 2,
            "cpus_per_worker": 0.4,
            "min_batch": args.batch,
            "samples_per_cell": 1e-9,
            "calibrate": "off",
            # at small D independent points are the cheapest per unit of accuracy (the
            # calibration's pick at D = 16); pinned so that every run does the same work
            "lattice": args.lattice,
            "eval_samples": 0,
            "stop": "cap",
            "log_every": 1,
            "checkpoint_every": args.iters,
        }
        with Stage("fit", stages) as r:
            run_fit(FitConfig(**fit, iters=args.iters, overwrite=True))
            _fit_figures(r, fit_out)
        _unmark(fit_out)
        with Stage("resume", stages) as r:
            run_fit(FitConfig(**fit, iters=args.iters + args.resume_iters, resume=True))
            _fit_figures(r, fit_out, since=args.iters)
        with Stage("sample", stages) as r:
            s = run_sample(
                SampleConfig(
                    targets=targets,
                    potential=fit_out,
                    model=f"gmm:{model}",
                    num=args.num,
                    out=samples,
                    sampler="ddim",
                    nfe=args.nfe,
                    workers=2,
                    cpus_per_worker=0.9,
                    chunk=8192,
                    overwrite=True,
                )
            )
            r.update(rows_written=s["written"], samples_per_s=round(s["samples_per_s"], 1))
        with Stage("read", stages) as r:
            _, table = datasets.read_samples(samples)
            ids = table.column("sample_id").to_numpy()
            r.update(rows_read=len(table), distinct_sample_ids=int(len(np.unique(ids))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"n": args.n, "dim": args.dim, "batch": args.batch, "uri": root, "stages": stages}


def _unmark(fit_out: str) -> None:
    """Remove the fit's ``_SUCCESS``, as if it had stopped at its last checkpoint."""
    fs, path = storage.url_to_fs(fit_out)
    fs.rm_file(f"{path.rstrip('/')}/{storage.SUCCESS}")


def _fit_figures(record: dict, fit_out: str, since: int = 0) -> None:
    """Bytes into the driver per iteration, the checkpoint's size, iterations so far (the
    medians over the iterations after ``since``)."""
    metrics = [m for m in _metrics(fit_out) if m["iter"] > since]
    record.update(
        iterations=metrics[-1]["iter"],
        driver_bytes_per_iter=int(np.median([m.get("bytes_moved", 0) for m in metrics])),
        seconds_per_iter=round(float(np.median([m.get("t_iter", 0.0) for m in metrics])), 3),
    )
    fs, path = storage.url_to_fs(storage.join(fit_out, datasets.CHECKPOINT))
    record["checkpoint_bytes"] = int(fs.size(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=IMAGENET_N, help="targets N (ImageNet's)")
    parser.add_argument("--dim", type=int, default=16, help="dimension D")
    parser.add_argument("--components", type=int, default=1000, help="mixture components")
    parser.add_argument("--step", type=int, default=100, help="prepare's diffusion step M")
    parser.add_argument("--batch", type=int, default=65536, help="projections per iteration")
    parser.add_argument(
        "--lattice", type=int, default=0, help="lattice points per subspace (0: independent)"
    )
    parser.add_argument("--iters", type=int, default=5, help="fit iterations before the resume")
    parser.add_argument("--resume-iters", type=int, default=2, help="iterations of the resume")
    parser.add_argument("--num", type=int, default=50000, help="samples")
    parser.add_argument("--nfe", type=int, default=4, help="sampler steps (DDIM)")
    parser.add_argument("--uri", default=None, help="where the data sets go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report))
    return 0
