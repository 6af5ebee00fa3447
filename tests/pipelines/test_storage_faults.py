"""Storage faults for prepare, fit and sample against real moto servers.

- Outage mid-run: a moto server in its own process (``moto_process``) is hung (SIGSTOP) or
  killed and brought back with its objects (connection refused meanwhile) after some parts /
  chunks / checkpoints are committed. The job retries and finishes, or (retries set low)
  fails with one line naming the object; a rerun with the same arguments finishes.
- Two writers, one output: two ``dpmot sample`` / ``dpmot prepare`` processes started
  together; a fit and a resumed fit; a frozen fit whose lease expires.
- Permissions lost mid-run (the moto user's policy changed between two chunks / parts).

Every test counts what the output holds afterwards (:func:`storefaults.audit`: rows,
duplicates, partial data files, temporary files, ``_SUCCESS``) and compares the values with a
run that met no fault.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from storefaults import audit, in_thread, wait_until

from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.io.datasets import read_samples
from dpmot_dist.ot.solver import SolverState
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample

FAULTS = ["hang", "refused"]
OUTAGE_S = 2.0  # longer than the 1 s timeouts of the tests' retry policy


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the faulted runs and their references compute identical bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Problems and their fault-free references


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> dict:
    """Inputs of all three jobs (local files) and each job's fault-free output."""
    root = tmp_path_factory.mktemp("faults")
    d = 4
    means = np.zeros((2, d))
    means[0, 0], means[1, 0] = 1.0, -1.0
    mix = GaussianMixture(means, np.array([0.1, 0.1]), np.array([0.5, 0.5]))
    mix.save(str(root / "gmm.npz"))
    sch, g, n = Schedule(), torch.Generator().manual_seed(0), 30
    y = sch.diffuse(mix.sample(n, g), 999, torch.randn(n, d, generator=g)).numpy()
    extra = {"schedule": sch.to_dict(), "step": 999, "data_shape": [d]}
    datasets.write_targets(str(root / "targets"), y, rows_per_part=25, extra=extra)
    potential = str(root / "potential")
    storage.save_npy(storage.join(potential, "h.npy"), np.zeros(n))
    storage.write_json_atomic(storage.join(potential, "_manifest.json"), {"source": "gaussian"})
    storage.mark_success(potential)
    np.save(root / "x.npy", np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32))
    np.save(root / "y.npy", np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32))
    p = {
        "root": root,
        "sample": {
            "targets": str(root / "targets"),
            "potential": potential,
            "model": f"gmm:{root / 'gmm.npz'}",
        },
        "prepare": {"data": str(root / "x.npy")},
        "fit": {"targets": str(root / "y.npy")},
    }
    run_sample(sample_config(p, str(root / "ref-samples")))
    p["ref_samples"] = read_samples(str(root / "ref-samples"))[1]
    run_prepare(prepare_config(p, str(root / "ref-targets")))
    p["ref_targets"] = datasets.load_targets(str(root / "ref-targets"))
    run_fit(fit_config(p, str(root / "ref-fit")))
    p["ref_h"] = np.load(root / "ref-fit" / "h.npy")
    return p


def sample_config(p: dict, out: str, **kw) -> SampleConfig:
    """32 samples in 8 chunks of 4, 1000 DDPM steps each: ~0.5 s a chunk."""
    opts = {"num": 32, "chunk": 4, "sampler": "ddpm", "backend": "torch", **kw}
    return SampleConfig(**p["sample"], out=out, **opts)


def prepare_config(p: dict, out: str, **kw) -> PrepareConfig:
    """500 rows in 100 parts of 5 (one put each)."""
    return PrepareConfig(**p["prepare"], out=out, step=5, rows_per_part=5, workers=0, **kw)


def fit_config(p: dict, out: str, **kw) -> FitConfig:
    """40 iterations, a checkpoint every 4."""
    opts = {"iters": 40, "eval_samples": 0, "chunk": 2048, "patience": 3, "lattice": 0}
    opts.update(checkpoint_every=4, min_batch=20000, **kw)
    return FitConfig(**p["fit"], out=out, **opts)


JOBS = {
    "prepare": (prepare_config, run_prepare),
    "sample": (sample_config, run_sample),
    "fit": (fit_config, run_fit),
}


def committed(out: str, job: str) -> int:
    """What the job has committed so far: parts, chunks or checkpoints (0 or 2)."""
    if job == "fit":
        return 2 * int(storage.exists(storage.join(out, datasets.CHECKPOINT)))
    prefix = "part-" if job == "prepare" else "chunk-"
    return sum(n.startswith(prefix) for n in storage.list_names(out))


KEYS = {"prepare": "index", "sample": "sample_id"}


def check_output(p: dict, out: str, job: str) -> dict:
    """The finished output of ``job`` holds exactly the fault-free run's rows; its audit."""
    if job == "fit":
        assert storage.is_success(out)
        np.testing.assert_array_equal(storage.load_npy(storage.join(out, "h.npy")), p["ref_h"])
        metrics = storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()
        iters = [json.loads(line)["iter"] for line in metrics]
        assert iters == sorted(set(iters)) and iters[-1] == 40
        names = storage.list_names(out)
        assert not [n for n in names if n.startswith(".")] and storage.LEASE_DIR not in names
        return {"rows": len(p["ref_h"]), "duplicates": 0, "partial": 0, "success": True}
    if job == "prepare":
        a = audit(out, "index")
        np.testing.assert_array_equal(datasets.load_targets(out), p["ref_targets"])
        expected = len(p["ref_targets"])
    else:
        a = audit(out, "sample_id")
        assert read_samples(out)[1].equals(p["ref_samples"])
        expected = p["ref_samples"].num_rows
    assert a["keys"] == list(range(expected))
    assert (a["rows"], a["duplicates"], a["partial"], a["temporaries"]) == (expected, 0, 0, 0)
    assert a["success"]
    return a


def _counts(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "keys"}


def one_line(e: BaseException | None) -> str:
    assert isinstance(e, DpmotError), repr(e)
    assert "\n" not in str(e)
    return str(e)


# ---------------------------------------------------------------------------------------------
# Outage mid-run


@pytest.mark.parametrize("job", list(JOBS))
@pytest.mark.parametrize("fault", FAULTS)
def test_outage_mid_run_is_retried_and_the_job_finishes(
    job, fault, problem, moto_process, caplog, record_property
) -> None:
    """The store hangs / refuses for 2 s after the job committed some of its output: the job
    waits, retrying with backoff (each retry logged once), and its output is exact."""
    make, run = JOBS[job]
    out = f"{moto_process.bucket}/{job}"
    caplog.set_level("WARNING", "dpmot_dist.io.storage")
    thread, result = in_thread(lambda: run(make(problem, out)))
    wait_until(lambda: committed(out, job) >= 2 or not thread.is_alive(), 120, "commits")
    assert thread.is_alive(), result  # the fault lands mid-run
    assert not storage.is_success(out)
    record_property("committed_at_fault", committed(out, job))
    moto_process.fault(fault, OUTAGE_S)
    thread.join(120)
    assert "error" not in result, result.get("error")
    retries = [int(n) for n in re.findall(r"; retry (\d+) of 40 in", caplog.text)]
    assert retries and retries.count(1) >= 1 and max(retries) <= 40
    record_property("retries_logged", len(retries))
    record_property("output", _counts(check_output(problem, out, job)))


@pytest.mark.parametrize("job", list(JOBS))
def test_outage_longer_than_the_retries_fails_with_one_line_then_a_rerun_finishes(
    job, problem, moto_process, monkeypatch, record_property
) -> None:
    """With 2 retries the job gives up on the first object it cannot write, naming it; nothing
    half-written is left; the same command after the store is back finishes exactly."""
    monkeypatch.setenv("DPMOT_IO_RETRIES", "2")
    make, run = JOBS[job]
    out = f"{moto_process.bucket}/{job}"
    thread, result = in_thread(lambda: run(make(problem, out)))
    wait_until(lambda: committed(out, job) >= 2 or not thread.is_alive(), 120, "commits")
    assert thread.is_alive(), result
    moto_process.kill()
    thread.join(120)
    message = one_line(result.get("error"))
    assert message.startswith(f"{out}/") and "gave up after 3 attempts" in message
    record_property("error", message)
    moto_process.start()  # back, with every object it had committed
    assert not storage.is_success(out)
    if job in KEYS:
        before = audit(out, KEYS[job])
        assert (before["partial"], before["duplicates"], before["temporaries"]) == (0, 0, 0)
        record_property("before_rerun", _counts(before))
    run(make(problem, out, resume=True) if job == "fit" else make(problem, out))
    record_property("output", _counts(check_output(problem, out, job)))


# ---------------------------------------------------------------------------------------------
# Two writers, one output


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dpmot_dist.cli", "--log-level", "ERROR", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},  # as a 1-CPU worker
    )


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    return [(p.wait(300), *p.communicate()) for p in procs]


def sample_flags(p: dict, out: str) -> list[str]:
    inputs = [flag for k, v in p["sample"].items() for flag in (f"--{k}", v)]
    flags = ["--num", "32", "--chunk", "4", "--sampler", "ddpm", "--backend", "torch"]
    return ["sample", *inputs, *flags, "--out", out]


@pytest.fixture(params=["local", "s3"])
def output_root(request: pytest.FixtureRequest, tmp_path) -> str:
    return request.getfixturevalue("s3_bucket") if request.param == "s3" else str(tmp_path)


def test_two_sample_runs_on_one_output(problem, output_root, record_property) -> None:
    """Both finish (or one finds the output complete); every chunk is committed by exactly
    one of them, and the output holds each sample once."""
    out = storage.join(output_root, "samples")
    runs = finish([cli(*sample_flags(problem, out)) for _ in range(2)])
    chunks = []
    for rc, stdout, stderr in runs:
        assert rc == 0, stderr
        found = re.search(r"wrote \d+ samples \((\d+) chunks", stdout)
        chunks.append(int(found.group(1)) if found else 0)
        assert found or "already complete" in stdout, stdout
    assert sum(chunks) == 8  # first writer wins each chunk
    record_property("chunks_per_writer", chunks)
    a = audit(out, "sample_id")
    record_property("output", _counts(a))
    assert (a["rows"], a["duplicates"], a["partial"], a["temporaries"]) == (32, 0, 0, 0)
    assert a["success"]
    table = read_samples(out)[1]
    x = np.stack(table.column("x").to_numpy(zero_copy_only=False))
    ref = np.stack(problem["ref_samples"].column("x").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(x, ref, atol=1e-5)  # other thread counts: last bits may differ


def test_two_prepare_runs_on_one_output(problem, output_root, record_property) -> None:
    """Both finish, or the second finds a complete output and refuses with one line; the
    targets are exactly the fault-free run's, each row once."""
    out = storage.join(output_root, "targets")
    args = ["prepare", "--data", problem["prepare"]["data"], "--out", out, "--step", "5"]
    runs = finish([cli(*args, "--rows-per-part", "5", "--workers", "0") for _ in range(2)])
    assert any(rc == 0 for rc, _, _ in runs)
    for rc, _, stderr in runs:
        if rc != 0:
            assert rc == 2 and stderr.count("\n") == 1 and "output exists (a complete" in stderr
    a = audit(out, "index")
    record_property("exit_codes", [rc for rc, _, _ in runs])
    record_property("output", _counts(a))
    assert (a["rows"], a["duplicates"], a["partial"], a["temporaries"]) == (500, 0, 0, 0)
    assert a["success"] and a["files"] == 100
    np.testing.assert_array_equal(datasets.load_targets(out), problem["ref_targets"])


def test_two_sample_runs_of_different_options_never_mix(problem, tmp_path) -> None:
    out = str(tmp_path / "samples")
    flags = sample_flags(problem, out)
    other = [*flags[:-2], "--seed", "7", "--out", out]
    runs = finish([cli(*flags), cli(*other)])
    codes = sorted(rc for rc, _, _ in runs)
    assert codes == [0, 2], runs
    loser = next(stderr for rc, _, stderr in runs if rc == 2)
    assert loser.count("\n") == 1 and "holds a run with other options (seed" in loser
    a = audit(out, "sample_id")
    assert (a["rows"], a["duplicates"], a["partial"], a["temporaries"]) == (32, 0, 0, 0)
    seeds = set(read_samples(out)[1].column("seed").to_pylist())
    assert len(seeds) == 1  # one run's samples only


def test_a_resumed_fit_refuses_while_the_first_holds_the_folder(problem, output_root) -> None:
    out = storage.join(output_root, "fit")
    thread, result = in_thread(lambda: run_fit(fit_config(problem, out, iters=60)))
    wait_until(lambda: storage.exists(storage.join(out, datasets.CHECKPOINT)), 120, "checkpoint")
    for second in (fit_config(problem, out, resume=True), fit_config(problem, out)):
        with pytest.raises(DpmotError) as info:
            run_fit(second)
        message = one_line(info.value)
        assert message.startswith(f"{out}: in use by another run (pid {os.getpid()} on ")
    thread.join(300)
    assert "error" not in result and storage.is_success(out)
    assert run_fit(fit_config(problem, out, iters=60, resume=True)) is None  # complete
    assert storage.LEASE_DIR not in storage.list_names(out)


def test_a_frozen_fit_loses_its_lease_to_a_resumed_fit(problem, tmp_path) -> None:
    """Fit A (its own process, lease TTL 4 s) is frozen with SIGSTOP; a resumed fit B is
    refused while A's lease is live, takes over once it expired and finishes; A, thawed,
    stops at its next checkpoint with one line and writes nothing more."""
    out = str(tmp_path / "fit")
    args = ["fit", "--targets", problem["fit"]["targets"], "--out", out, "--eval-samples", "0"]
    args += ["--lattice", "0", "--min-batch", "20000", "--checkpoint-every", "4"]
    args += ["--chunk", "2048", "--patience", "3"]  # as fit_config
    a = cli(*args, "--iters", "100000", env={"DPMOT_LEASE_TTL": "4"})
    ckpt = Path(out) / datasets.CHECKPOINT
    try:
        wait_until(lambda: ckpt.exists() or a.poll() is not None, 120, "A's checkpoint")
        assert a.poll() is None, a.communicate()
        os.kill(a.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        iteration = SolverState.from_bytes(ckpt.read_bytes()).iteration
        b = fit_config(problem, out, resume=True, iters=iteration + 8)
        with pytest.raises(DpmotError, match=f"in use by another run \\(pid {a.pid} "):
            run_fit(b)
        time.sleep(max(0.0, 4.5 - (time.monotonic() - frozen_at)))
        assert run_fit(b) is not None
        h = np.load(Path(out) / "h.npy")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    rc, _, stderr = finish([a])[0]
    assert rc == 2 and stderr.count("\n") == 1 and "lost the output lease" in stderr
    np.testing.assert_array_equal(np.load(Path(out) / "h.npy"), h)  # A wrote nothing after
    assert storage.is_success(out)


# ---------------------------------------------------------------------------------------------
# Permissions lost mid-run


def deny_puts(resource: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:PutObject", "Resource": resource},
            ],
        }
    )


ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def set_policy(moto_user: dict, document: str) -> None:
    boto3.session.Session().client("iam").put_user_policy(  # the switched-on credentials
        UserName=moto_user["name"], PolicyName="all", PolicyDocument=document
    )


def test_sample_credentials_revoked_between_two_chunks(
    problem, s3_bucket, moto_user, record_property
) -> None:
    """The user's policy loses s3:PutObject after two chunks (as when a token expires): the run
    stops with one line naming the chunk, nothing half-written; with the policy back, the same
    command writes the rest."""
    out = f"{s3_bucket}/samples"
    moto_user["switch_on"](moto_user["secret"])
    thread, result = in_thread(lambda: run_sample(sample_config(problem, out)))
    wait_until(lambda: committed(out, "sample") >= 2 or not thread.is_alive(), 120, "chunks")
    set_policy(moto_user, deny_puts("*"))
    thread.join(120)
    message = one_line(result.get("error"))
    assert re.fullmatch(
        rf"{out}/chunk-\d{{5}}\.parquet: access denied \(check AWS credentials.*\)", message
    )
    a = audit(out, "sample_id")
    record_property("error", message)
    record_property("at_denial", _counts(a))
    assert a["rows"] == 4 * a["files"] and a["rows"] >= 8 and a["duplicates"] == 0
    assert (a["partial"], a["temporaries"], a["success"]) == (0, 0, False)
    set_policy(moto_user, ALLOW_ALL)
    s = run_sample(sample_config(problem, out))
    assert s["chunks_written"] == 8 - a["files"]
    check_output(problem, out, "sample")


def test_prepare_denied_one_part_then_rerun(problem, s3_bucket, moto_user) -> None:
    out = f"{s3_bucket}/targets"
    bucket = s3_bucket.removeprefix("s3://")
    moto_user["switch_on"](moto_user["secret"])
    set_policy(moto_user, deny_puts(f"arn:aws:s3:::{bucket}/targets/part-00003.parquet"))
    with pytest.raises(DpmotError) as info:
        run_prepare(prepare_config(problem, out))
    assert one_line(info.value) == (
        f"{out}/part-00003.parquet: access denied (check AWS credentials / AWS_ENDPOINT_URL)"
    )
    a = audit(out, "index")
    assert (a["files"], a["rows"], a["partial"], a["temporaries"]) == (3, 15, 0, 0)
    assert not a["success"] and not storage.exists(storage.join(out, datasets.MANIFEST))
    set_policy(moto_user, ALLOW_ALL)
    run_prepare(prepare_config(problem, out))
    check_output(problem, out, "prepare")
