r"""``dpmot bench device``: every GPU path of the system in one run, one JSON report.

The device check of a GPU machine (``cluster/device-check.sh`` installs the wheels carried
with the repository, then calls ``dpmot bench device --device cuda``). Each step runs the
real command lines, each in a process group of its own under the step's time limit, so that
an import error, a crash inside a CUDA library or a hang ends only that step: the report
records ``{"error": ...}`` for it (with what the step had measured so far and the end of the
failing command's output), and the next step runs.

- ``search``: ``dpmot bench search`` at N × D × B over the GPU backends (Triton bf16 and
  fp16, torch fp32 and bf16, faiss-gpu; every candidate pass followed by the exact float64
  re-score) and the lattice source's search, beside the plain fp32 and bf16 matmul rates of
  the same run; per backend the fraction of rows whose candidates were all re-scored and of
  rows whose winner the re-score changed (:mod:`dpmot_dist.benchmarks.search`).
- ``fit``: ``dpmot fit`` of N × D Gaussian targets for I iterations on one device (in
  process); from ``metrics.jsonl``, after ``fit_warmup`` iterations, the median seconds per
  iteration and the search share Σ t_search / Σ t_iter.
- ``sample``: random images forward-diffused into a targets data set, a short ``dpmot fit``
  for their potential, then ``dpmot sample`` of S samples with a small random diffusers
  ``UNet2DModel`` (built and saved here by :func:`save_unet`) in fp16 on CUDA; samples/s and
  model evaluations/s from the samples' manifest.
- ``tests``: ``pytest -m cuda`` over the files of ``tests`` that mark tests ``cuda`` (the
  suite's CUDA-marked tests): passed, failed, errors, skipped, and each failure's first line.

``--quick`` shrinks every size (the CI runs the whole path so on the CPU, Triton in its
interpreter); ``--set FIELD=VALUE`` changes one field of :class:`DeviceCheck`. The folder
``--out`` receives ``<step>.json`` for each step, ``commands.log`` (the end of every
command's output) and ``device-report.json``, rewritten after every step so that a run killed
from outside leaves the steps done so far::

    {"device": "cuda", "check": {DeviceCheck's fields}, "environment": {versions, GPU},
     "steps": {"search": {...}, "fit": {...}, "sample": {...}, "tests": {...}},
     "summary": {the figures the table prints}, "goals": {...} (on CUDA)}

Each step holds ``seconds`` and either its figures or ``error``. The goals are issue 20's:
the fused search ≥ 0.7 of the bf16 matmul rate and ≥ 8× faiss-gpu's fp32 rate with
fp32-exact winners, the fit's search share ≥ 90%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the checkout holding dpmot_dist/ and tests/
STEPS = ("search", "fit", "sample", "tests")
REPORT = "device-report.json"
COMMANDS_LOG = "commands.log"
LOG_TAIL = 20  # lines of a failed command's output kept in its step's record
SEARCH_BACKENDS = {  # what ``dpmot bench search`` measures on each device
    "cuda": "triton:bfloat16,triton:float16,torch:float32,torch:bfloat16,faiss:float32",
    "cpu": "torch:float32,torch:bfloat16,faiss:float32,triton:bfloat16",
}
LATTICE_BACKEND = {"cuda": "triton:bfloat16", "cpu": "torch"}
GOALS = {"fused_vs_bf16_matmul": 0.7, "fused_vs_faiss_fp32": 8.0, "fit_search_share": 0.9}


@dataclass(frozen=True, kw_only=True)
class DeviceCheck:
    """Sizes and time limits of one device check (defaults: the H200 run of issue 20).

    Attributes:
        device: cuda or cpu.
        search_n, search_dim, search_batch: N, D, B of ``bench search``; search_repeat its
            timing rounds; search_lattice the lattice points per subspace (0: none).
        search_backends: ``bench search --backends`` (None: :data:`SEARCH_BACKENDS`);
            lattice_backend: the index searching the lattice (None: :data:`LATTICE_BACKEND`).
        fit_n, fit_dim, fit_iters: the fit's N, D and iterations; fit_storage_dtype,
            fit_chunk its storage dtype and source samples per search call; fit_warmup the
            iterations left out of its figures.
        sample_num: samples written; sample_targets: images prepared as targets, of
            sample_channels × sample_size² values; sample_fit_iters: iterations of their
            potential; sample_nfe: model evaluations per sample; sample_dtype: the model's
            dtype (None: float16 on cuda, float32 on cpu); sample_batch: samples per call.
        tests: the paths whose CUDA-marked test files ``pytest -m cuda`` runs (space-separated,
            relative to the checkout).
        timeout_*: seconds each step may take; budget: seconds the whole check may take
            (a step gets what is left if less).
    """

    device: str = "cuda"
    search_n: int = 160_000
    search_dim: int = 4096
    search_batch: int = 65_536
    search_repeat: int = 3
    search_lattice: int = 64
    search_backends: str | None = None
    lattice_backend: str | None = None
    fit_n: int = 100_000
    fit_dim: int = 4096
    fit_iters: int = 20
    fit_warmup: int = 2
    fit_storage_dtype: str = "bfloat16"
    fit_chunk: int = 65_536
    sample_num: int = 2048
    sample_targets: int = 4096
    sample_channels: int = 3
    sample_size: int = 32
    sample_fit_iters: int = 5
    sample_nfe: int = 10
    sample_dtype: str | None = None
    sample_batch: int = 512
    tests: str = "tests"
    timeout_search: float = 150.0
    timeout_fit: float = 120.0
    timeout_sample: float = 75.0
    timeout_tests: float = 105.0
    budget: float = 450.0

    def timeout(self, step: str) -> float:
        return getattr(self, f"timeout_{step}")


# Sizes of ``--quick``: the whole path in seconds on a CPU (CI), Triton in its interpreter.
QUICK = {
    "search_n": 600,
    "search_dim": 16,
    "search_batch": 64,
    "search_repeat": 1,
    "search_lattice": 16,
    "fit_n": 300,
    "fit_dim": 8,
    "fit_iters": 4,
    "fit_warmup": 1,
    "fit_chunk": 1024,
    "sample_num": 16,
    "sample_targets": 48,
    "sample_size": 8,
    "sample_fit_iters": 0,
    "sample_nfe": 2,
    "sample_batch": 16,
}


def with_settings(check: DeviceCheck, settings: list[str]) -> DeviceCheck:
    """``check`` with ``FIELD=VALUE`` settings applied (values parsed by the field's type;
    ``none`` clears an optional field)."""
    fields = {f.name: f for f in dataclasses.fields(DeviceCheck)}
    changes = {}
    for item in settings:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, FIELD one of {sorted(fields)}")
        kind = str(fields[name].type)
        if "None" in kind and text.lower() in ("", "none"):
            changes[name] = None
        elif kind.startswith("int"):
            changes[name] = int(float(text))
        elif kind.startswith("float"):
            changes[name] = float(text)
        else:
            changes[name] = text
    return dataclasses.replace(check, **changes)


# ---------------------------------------------------------------------------------------------
# Running commands


class StepError(RuntimeError):
    """A command of a step failed; ``log_tail`` holds the end of its output."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass
class Runner:
    """Runs a step's commands: the checkout first on PYTHONPATH, every command's output in
    ``logs/`` of the work folder, the end of it appended to ``commands.log`` in ``out``."""

    work: Path
    out: Path
    count: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # each command's

    def __call__(self, cmd: list[str], deadline: float, what: str) -> str:
        """Run ``cmd`` (from the checkout) until ``deadline`` (time.monotonic); its stdout.

        Raises StepError when it exits non-zero, cannot start, or outlives the deadline
        (then its process group is killed).
        """
        self.count += 1
        log = self.work / "logs" / f"{self.count:02d}-{what}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        t0 = time.monotonic()
        limit = max(1.0, deadline - t0)
        with open(log, "w") as err:
            try:
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                raise StepError(f"{what}: cannot start {cmd[0]}: {e}", []) from None
            try:
                stdout, _ = proc.communicate(timeout=limit)
                failure = None if proc.returncode == 0 else f"exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, alone
                stdout, _ = proc.communicate()
                failure = f"timed out after {limit:.0f} s"
        text = log.read_text(errors="replace").splitlines() + (stdout or "").splitlines()
        self.seconds[what] = time.monotonic() - t0
        self._keep(cmd, what, failure, text)
        if failure:
            last = next((line for line in reversed(text) if line.strip()), "")
            raise StepError(f"{what} {failure}: {last.strip()[:300]}", text[-LOG_TAIL:])
        return stdout

    def _keep(self, cmd: list[str], what: str, failure: str | None, lines: list[str]) -> None:
        with open(self.out / COMMANDS_LOG, "a") as f:
            f.write(f"==== {what}: {' '.join(cmd)}  [{failure or 'ok'}]\n")
            f.writelines(line + "\n" for line in lines[-200:])


def dpmot(*args: object) -> list[str]:
    """The command line of ``dpmot ARGS`` run by this Python."""
    return [sys.executable, "-m", "dpmot_dist.cli", *map(str, args)]


# ---------------------------------------------------------------------------------------------
# The steps: each fills ``result`` as it goes (what it measured stays when a later part fails)


StepFn = Callable[[DeviceCheck, Runner, float, dict], None]


def step_search(check: DeviceCheck, run: Runner, deadline: float, result: dict) -> None:
    """``dpmot bench search`` over the device's backends; its JSON report."""
    backends = check.search_backends or SEARCH_BACKENDS[check.device]
    lattice = check.lattice_backend or LATTICE_BACKEND[check.device]
    cmd = dpmot(
        "bench", "search", "--device", check.device, "--n", check.search_n,
        "--dim", check.search_dim, "--batch", check.search_batch,
        "--repeat", check.search_repeat, "--backends", backends,
        "--lattice", check.search_lattice, "--lattice-backend", lattice, "--json",
    )  # fmt: skip
    result.update(_last_json(run(cmd, deadline, "bench-search")))


def step_fit(check: DeviceCheck, run: Runner, deadline: float, result: dict) -> None:
    """``dpmot fit`` of Gaussian targets on one device; figures from ``metrics.jsonl``."""
    from dpmot_dist.benchmarks.fit import synthetic_targets

    targets = synthetic_targets(run.work / "fit-y.npy", check.fit_n, check.fit_dim)
    out = run.work / "fit"
    result.update(n=check.fit_n, dim=check.fit_dim, storage_dtype=check.fit_storage_dtype)
    cmd = dpmot(
        "fit", "--targets", targets, "--out", out, "--device", check.device,
        "--workers", 0, "--iters", check.fit_iters,
        "--storage-dtype", check.fit_storage_dtype, "--chunk", check.fit_chunk,
        "--calibrate", "off", "--eval-samples", 0, "--log-every", 1,
        "--checkpoint-every", 5, "--stop", "cap", "--overwrite",
    )  # fmt: skip
    try:
        run(cmd, deadline, "fit")
    finally:  # a fit stopped by its deadline still leaves its checkpointed records
        result.update(fit_figures(_records(out / "metrics.jsonl"), check.fit_warmup))


def fit_figures(records: list[dict], warmup: int) -> dict:
    """Median seconds per iteration and of search, and the search share Σ t_search / Σ t_iter,
    over the records after the first ``warmup`` (all of them when there are no more)."""
    if not records:
        return {"iterations": 0}
    timed = records[warmup:] or records
    t_iter = [r["t_iter"] for r in timed]
    t_search = [r.get("t_search", 0.0) for r in timed]
    return {
        "iterations": len(records),
        "batch": int(timed[-1]["batch"]),
        "points": int(timed[-1].get("points", timed[-1]["batch"])),
        "first_iter_seconds": records[0]["t_iter"],
        "seconds_per_iter": statistics.median(t_iter),
        "search_seconds_per_iter": statistics.median(t_search),
        "search_fraction": sum(t_search) / max(sum(t_iter), 1e-12),
        "samples_per_s": timed[-1]["batch"] / max(statistics.median(t_iter), 1e-12),
    }


def step_sample(check: DeviceCheck, run: Runner, deadline: float, result: dict) -> None:
    """Image targets (:func:`write_image_targets`) → a short fit (none with
    ``sample_fit_iters`` = 0: h = 0) → ``dpmot sample`` with a small random UNet saved by
    :func:`save_unet`; the throughput."""
    dtype = check.sample_dtype or ("float16" if check.device == "cuda" else "float32")
    shape = (check.sample_channels, check.sample_size, check.sample_size)
    result.update(num=check.sample_num, dtype=dtype, data_shape=list(shape), nfe=check.sample_nfe)
    work = run.work
    unet = work / "unet"
    save_unet(str(unet), check.sample_channels, check.sample_size)
    targets, samples = work / "targets", work / "samples"
    write_image_targets(targets, check.sample_targets, shape)
    if check.sample_fit_iters:
        potential = work / "sample-fit"
        run(
            dpmot("fit", "--targets", targets, "--out", potential, "--device", check.device,
                  "--workers", 0, "--iters", check.sample_fit_iters, "--calibrate", "off",
                  "--eval-samples", 0, "--overwrite"),
            deadline, "sample-fit",
        )  # fmt: skip
    else:  # h = 0 (the map's cost does not depend on h)
        potential = work / "h0.npy"
        np.save(potential, np.zeros(check.sample_targets))
    run(
        dpmot("sample", "--targets", targets, "--potential", potential,
              "--model", f"diffusers:{unet}", "--num", check.sample_num, "--out", samples,
              "--device", check.device, "--dtype", dtype, "--sampler", "ddim",
              "--nfe", check.sample_nfe, "--batch", check.sample_batch,
              "--chunk", max(check.sample_batch, check.sample_num // 2), "--overwrite"),
        deadline, "sample",
    )  # fmt: skip
    manifest = json.loads((samples / "_manifest.json").read_text())
    t = manifest["throughput"]
    keys = ("samples_per_s", "model_evals_per_s", "phase2_samples_per_s", "map_seconds")
    result.update({k: t[k] for k in keys}, written=t["samples_written"], nfe=manifest["nfe"])


def write_image_targets(folder: Path, n: int, shape: tuple[int, ...], step: int = 200) -> None:
    """A targets data set of n random images in [−1, 1] forward-diffused to ``step`` of the
    vp-linear schedule (what ``dpmot prepare`` writes; seed 0)."""
    import torch

    from dpmot_dist.diffusion.schedules import Schedule
    from dpmot_dist.io import datasets

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, *shape, generator=gen).mul_(2).sub_(1)
    schedule = Schedule()
    y = schedule.diffuse(x0, step, torch.randn(x0.shape, generator=gen))
    extra = {"schedule": schedule.to_dict(), "step": step, "data_shape": list(shape)}
    datasets.write_targets(str(folder), y.numpy(), extra=extra)


def save_unet(folder: str, channels: int = 3, size: int = 32) -> None:
    """Save a small random diffusers ``UNet2DModel`` (channels × size², seed 0) to ``folder``:
    two resolutions of 32 and 64 channels (8 and 16 below size 16)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    width = (32, 64) if size >= 16 else (8, 16)
    diffusers.UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=width,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=width[0] // 2,
    ).save_pretrained(folder)


def step_tests(check: DeviceCheck, run: Runner, deadline: float, result: dict) -> None:
    """``pytest -m cuda`` over the test files of ``check.tests`` that mark tests ``cuda``
    (:func:`cuda_test_files`); counts and failures from its JUnit XML."""
    files = cuda_test_files(check.tests.split())
    result["files"] = files
    if not files:
        raise StepError(f"no test file under {check.tests!r} marks a test cuda", [])
    junit = run.work / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
        "--continue-on-collection-errors", f"--junitxml={junit}", *files,
    ]  # fmt: skip
    try:
        run(cmd, deadline, "pytest")
    except StepError as e:
        # exit 1: some tests failed (the counts say which), 5: none selected; else broken
        if not junit.exists() or not any(f"exited with {rc}:" in str(e) for rc in (1, 5)):
            raise
    result.update(junit_counts(junit))


def cuda_test_files(paths: list[str]) -> list[str]:
    """The ``test_*.py`` files under ``paths`` (relative to the checkout) that use
    ``pytest.mark.cuda``: collecting only those, the run needs none of the packages that other
    test modules import (moto, botocore, ...), which a GPU image may lack."""
    found = []
    for p in paths:
        path = ROOT / p
        candidates = [path] if path.is_file() else sorted(path.rglob("test_*.py"))
        for f in candidates:
            if "pytest.mark.cuda" in f.read_text(errors="replace"):
                found.append(str(f.relative_to(ROOT)))
    return found


def junit_counts(path: Path) -> dict:
    """Passed / failed / errors / skipped of a JUnit XML file, and the failures' first lines."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failures = []
    for case in root.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failures.append({"test": name, "message": message[0][:300] if message else ""})
    passed = total["tests"] - total["failures"] - total["errors"] - skipped
    return {
        "passed": passed,
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": skipped,
        "failures": failures[:30],
    }


STEP_FUNCTIONS: dict[str, StepFn] = {
    "search": step_search,
    "fit": step_fit,
    "sample": step_sample,
    "tests": step_tests,
}


# ---------------------------------------------------------------------------------------------
# The run and its report


def run_check(
    check: DeviceCheck, out: Path, steps: tuple[str, ...] = STEPS, work: Path | None = None
) -> dict:
    """Run ``steps`` in order, each under its time limit; write and return the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / COMMANDS_LOG).write_text("")
    start = time.monotonic()
    report: dict = {
        "device": check.device,
        "check": dataclasses.asdict(check),
        "environment": environment(check.device),
        "steps": {},
    }
    with tempfile.TemporaryDirectory(prefix="dpmot-device-") as tmp:
        runner = Runner(Path(work or tmp), out)
        runner.work.mkdir(parents=True, exist_ok=True)
        for name in steps:
            left = check.budget - (time.monotonic() - start)
            if left < 5:
                result = {"error": f"not run: the check's budget of {check.budget:g} s was spent"}
            else:
                result = run_step(name, check, runner, min(check.timeout(name), left))
            report["steps"][name] = result
            (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            _finish(report, out)
    return report


def run_step(name: str, check: DeviceCheck, runner: Runner, limit: float) -> dict:
    """One step's record: its figures and ``seconds``, or ``error`` (and what it measured)."""
    result: dict = {}
    t0 = time.monotonic()
    (runner.work / name).mkdir(exist_ok=True)
    step_runner = Runner(runner.work / name, runner.out, runner.count)
    try:
        STEP_FUNCTIONS[name](check, step_runner, t0 + limit, result)
    except StepError as e:
        result.update(error=str(e), log_tail=e.log_tail)
    except Exception as e:  # a step's own code failing is recorded too, never fatal
        result.update(error=f"{type(e).__name__}: {e}")
    runner.count = step_runner.count
    result["seconds"] = time.monotonic() - t0
    result["command_seconds"] = step_runner.seconds
    return result


def _finish(report: dict, out: Path) -> None:
    report["summary"] = summary(report["steps"])
    if report["device"] == "cuda":
        report["goals"] = goals(report["summary"])
    text = json.dumps(report, indent=1, default=_jsonable) + "\n"
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(text)
    tmp.replace(out / REPORT)


def environment(device: str) -> dict:
    """Versions of what the check uses, and the GPU torch sees (each import may fail)."""
    env: dict = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "triton", "faiss", "ray", "diffusers", "numba", "pydantic"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # missing, or broken (a CUDA library that does not load)
            env[name] = f"unavailable: {type(e).__name__}: {e}"[:300]
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = {
                "name": p.name,
                "memory_gib": p.total_memory / 2**30,
                "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
                "count": torch.cuda.device_count(),
            }
    except Exception as e:
        env["cuda_error"] = f"{type(e).__name__}: {e}"[:300]
    from dpmot_dist.ot.search import faiss_available

    env["faiss_gpu"] = faiss_available("cuda") if device == "cuda" else False
    return env


def summary(steps: dict) -> dict:
    """The figures the table prints, from whichever steps have them."""
    out: dict = {}
    s = steps.get("search", {})
    if "backends" in s:
        out["fp32_matmul_gflops"] = s["matmul_gflops"]
        if "bf16_matmul_gflops" in s:
            out["bf16_matmul_gflops"] = s["bf16_matmul_gflops"]
        keys = ("gflops", "ratio", "ratio_bf16", "rescored_rows", "winner_changed", "disagree")
        out["search"] = {
            name: {k: b[k] for k in keys if k in b} for name, b in s["backends"].items()
        }
        if "lattice" in s:
            out["lattice"] = {k: v for k, v in s["lattice"].items() if k != "points"}
    f = steps.get("fit", {})
    if f.get("iterations"):
        out["fit_seconds_per_iter"] = f["seconds_per_iter"]
        out["fit_search_fraction"] = f["search_fraction"]
    p = steps.get("sample", {})
    if "samples_per_s" in p:
        out["samples_per_s"] = p["samples_per_s"]
        out["model_evals_per_s"] = p["model_evals_per_s"]
    t = steps.get("tests", {})
    if "passed" in t:
        out["tests"] = {k: t[k] for k in ("passed", "failed", "errors", "skipped")}
    out["errors"] = {name: r["error"] for name, r in steps.items() if "error" in r}
    return out


def goals(s: dict) -> dict:
    """Issue 20's goals, each {value, target, met}, where the run measured the value."""
    out: dict = {}
    fused = {k: v for k, v in s.get("search", {}).items() if k.startswith("triton")}
    if fused and "bf16_matmul_gflops" in s:
        best = max(v["gflops"] for v in fused.values())
        out["fused_vs_bf16_matmul"] = best / s["bf16_matmul_gflops"]
        if "faiss" in s["search"]:
            out["fused_vs_faiss_fp32"] = best / s["search"]["faiss"]["gflops"]
    if "fit_search_fraction" in s:
        out["fit_search_share"] = s["fit_search_fraction"]
    result = {k: {"value": v, "target": GOALS[k], "met": v >= GOALS[k]} for k, v in out.items()}
    if fused:
        exact = all(v.get("disagree", 1.0) == 0.0 for v in fused.values())
        result["fused_fp32_exact_winners"] = {"value": exact, "target": True, "met": exact}
    return result


def _last_json(stdout: str) -> dict:
    """The JSON object a ``--json`` benchmark prints as its last line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise StepError("the benchmark printed nothing", [])
    return json.loads(lines[-1])


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------
# The table


def format_report(report: dict) -> str:
    """The report as a short table: steps, then the figures of each."""
    env, s = report["environment"], report.get("summary", {})
    gpu = env.get("gpu", {}).get("name", "no GPU")
    versions = ", ".join(f"{k} {_short(env.get(k))}" for k in ("torch", "triton", "faiss", "ray"))
    lines = [f"device check on {report['device']} ({gpu}; {versions})", ""]
    lines.append(f"{'step':8s} {'status':7s} {'seconds':>8s}")
    for name, r in report["steps"].items():
        status = "error" if "error" in r else "ok"
        tail = f"  {r['error']}" if "error" in r else ""
        lines.append(f"{name:8s} {status:7s} {r.get('seconds', 0.0):8.1f}{tail}")
    search = report["steps"].get("search", {})
    if "backends" in search:
        bf16 = search.get("bf16_matmul_gflops")
        lines += [
            "",
            f"search N={search['n']:,} D={search['dim']:,} B={search['batch']:,}: plain fp32 "
            f"matmul {_rate(search['matmul_gflops']).strip()} GFLOP/s"
            + (f", plain bf16 matmul {_rate(bf16).strip()} GFLOP/s" if bf16 else ""),
            f"  {'backend':18s} {'GFLOP/s':>12s} {'÷fp32':>7s} {'÷bf16':>7s} {'re-scored':>9s} "
            f"{'changed':>8s} {'disagree':>8s}",
        ]
        rows = dict(search["backends"])
        if "lattice" in search:
            rows[f"lattice {search['lattice']['backend']}"] = search["lattice"]
        for name, b in rows.items():
            lines.append(
                f"  {name:18s} {_rate(b['gflops'])} {b['ratio']:7.3f} "
                f"{_num(b.get('ratio_bf16'), 7, 3)} {_num(b.get('rescored_rows'), 9, 3)} "
                f"{_num(b.get('winner_changed'), 8, 4)} {_num(b.get('disagree'), 8, 4)}"
            )
        for name, why in search.get("unavailable", {}).items():
            lines.append(f"  {name:18s} not run: {why}")
    fit = report["steps"].get("fit", {})
    if fit.get("iterations"):
        lines += [
            "",
            f"fit N={fit['n']:,} D={fit['dim']:,} ({fit['storage_dtype']}), "
            f"{fit['iterations']} iterations of {fit['batch']:,} samples: "
            f"{fit['seconds_per_iter']:.3g} s/iteration (median; the first "
            f"{fit['first_iter_seconds']:.3g} s), search {100 * fit['search_fraction']:.1f}% "
            "of it",
        ]
    sample = report["steps"].get("sample", {})
    if "samples_per_s" in sample:
        lines += [
            "",
            f"sample {sample['written']:,} samples {sample['data_shape']} in {sample['dtype']}, "
            f"NFE {sample['nfe']}: {sample['samples_per_s']:,.1f} samples/s, "
            f"{sample['model_evals_per_s']:,.0f} model evaluations/s",
        ]
    tests = s.get("tests")
    if tests:
        lines += ["", "tests -m cuda: " + ", ".join(f"{v} {k}" for k, v in tests.items())]
        lines += [
            f"  FAILED {f['test']}: {f['message']}" for f in report["steps"]["tests"]["failures"]
        ]
    for name, g in report.get("goals", {}).items():
        value = g["value"] if isinstance(g["value"], bool) else f"{g['value']:.3g}"
        lines.append(
            f"goal {name}: {value} (target {g['target']}): {'met' if g['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def _rate(v: float) -> str:
    return f"{v:12,.0f}" if v >= 100 else f"{v:12.3g}"


def _num(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def _short(v) -> str:
    text = str(v)
    return "missing" if text.startswith("unavailable") else text


# ---------------------------------------------------------------------------------------------
# The CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--out", default="device-out", help="folder of the report")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one size or limit (DeviceCheck's fields, e.g. fit_iters=10)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON last")


def cli_main(args: argparse.Namespace) -> int:
    from dpmot_dist.errors import DpmotError
    from dpmot_dist.runtime import resolve_device

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise DpmotError(f"--steps: unknown {unknown}; choose among {', '.join(STEPS)}")
    check = DeviceCheck(device=resolve_device(args.device))
    if args.quick:
        check = dataclasses.replace(check, **QUICK)
    try:
        check = with_settings(check, args.set)
    except ValueError as e:
        raise DpmotError(str(e)) from None
    report = run_check(check, Path(args.out), steps, Path(args.work) if args.work else None)
    print(format_report(report))
    print(f"\nreport: {Path(args.out) / REPORT}")
    if args.json:
        print(json.dumps(report, default=_jsonable))
    return 1 if report["summary"]["errors"] else 0
