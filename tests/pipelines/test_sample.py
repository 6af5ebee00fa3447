"""The sample pipeline: layout, resumability, Ray workers, S3, the CLI and real model kinds."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from testlib import Halve, tiny_unet

from dpmot_dist import cli
from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.io.datasets import PLAN, WORKERS, chunk_name, read_samples, written_chunks
from dpmot_dist.pipelines.sample import SampleConfig, run_sample


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one intra-op thread (as in a 1-CPU Ray worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_problem(root: Path, *, n: int = 64, step: int = 20, shape=(4,)) -> dict[str, str]:
    """A Gaussian-mixture targets data set at ``step``, its exact model and a potential h = 0."""
    d = int(np.prod(shape))
    means = np.zeros((2, d))
    means[0, 0], means[1, 0] = 1.0, -1.0
    mix = GaussianMixture(means, np.array([0.1, 0.1]), np.array([0.5, 0.5]))
    model = str(root / "gmm.npz")
    mix.save(model)
    sch = Schedule()
    g = torch.Generator().manual_seed(0)
    y = sch.diffuse(mix.sample(n, g), step, torch.randn(n, d, generator=g)).numpy()
    targets = str(root / "targets")
    extra = {"schedule": sch.to_dict(), "step": step, "data_shape": list(shape)}
    datasets.write_targets(targets, y.reshape(n, *shape), rows_per_part=25, extra=extra)
    potential = str(root / "fit")
    storage.save_npy(storage.join(potential, "h.npy"), np.zeros(n))
    storage.write_json_atomic(storage.join(potential, "_manifest.json"), {"source": "gaussian"})
    storage.mark_success(potential)
    return {"targets": targets, "potential": potential, "model": f"gmm:{model}"}


def config(problem: dict, out: str, **kw) -> SampleConfig:
    defaults = {"num": 50, "chunk": 16, "sampler": "ddim", "nfe": 5, "backend": "torch"}
    return SampleConfig(**problem, out=out, **{**defaults, **kw})


def mtimes(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_run_writes_every_sample_then_a_rerun_writes_nothing(tmp_path):
    problem = make_problem(tmp_path)
    out = tmp_path / "samples"
    s = run_sample(config(problem, str(out)))
    assert not s["complete"] and s["written"] == 50 and s["chunks_written"] == 4
    for key in ("samples_per_s", "model_evals_per_s", "map_fraction", "map_seconds"):
        assert s[key] >= 0
    m, table = read_samples(str(out))
    np.testing.assert_array_equal(table.column("sample_id").to_numpy(), np.arange(50))
    assert (table.column("nfe").to_numpy() == 5).all() and m["nfe"] == 5
    assert (table.column("seed").to_numpy() == 0).all()
    assert (
        (table.column("ot_index").to_numpy() >= 0) & (table.column("ot_index").to_numpy() < 64)
    ).all()
    assert str(table.schema.field("x").type) == "fixed_size_list<element: float>[4]"
    assert "png" not in table.column_names
    assert m["kind"] == "samples" and m["data_shape"] == [4] and m["step"] == 20
    assert m["map"] == "copy" and m["model"] == problem["model"] and m["num"] == 50
    assert pq.read_table(out / PLAN).num_rows == 50
    before = mtimes(out)
    again = run_sample(config(problem, str(out)))
    assert again["complete"] and again["written"] == 0
    assert mtimes(out) == before


def test_rerun_after_a_lost_chunk_writes_only_that_chunk(tmp_path):
    problem = make_problem(tmp_path)
    out = tmp_path / "samples"
    run_sample(config(problem, str(out), sampler="ddpm", nfe=None))
    _, reference = read_samples(str(out))
    for name in (chunk_name(1), storage.SUCCESS, datasets.MANIFEST):
        (out / name).unlink()
    before = mtimes(out)
    s = run_sample(config(problem, str(out), sampler="ddpm", nfe=None, workers=0))
    assert s["chunks_written"] == 1 and s["written"] == 16 and s["nfe"] == 21
    after = mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} == {
        chunk_name(1),
        storage.SUCCESS,
        datasets.MANIFEST,
    }
    _, table = read_samples(str(out))
    assert table.equals(reference)


def test_a_different_run_into_the_same_folder_is_refused(tmp_path):
    problem = make_problem(tmp_path)
    out = str(tmp_path / "samples")
    run_sample(config(problem, out))
    with pytest.raises(DpmotError, match="other options \\(num"):
        run_sample(config(problem, out, num=60))
    s = run_sample(config(problem, out, num=60, overwrite=True))
    assert s["written"] == 60


def test_interp_map_and_its_plan(tmp_path):
    problem = make_problem(tmp_path, n=40, step=5)
    out = tmp_path / "samples"
    s = run_sample(config(problem, str(out), map="interp", k=6, angle=60.0, num=30))
    assert s["written"] == 30
    plan = pq.read_table(out / PLAN)
    partner = plan.column("partner").to_numpy()
    assert (partner >= 0).any()
    weight = plan.column("weight").to_numpy()
    assert ((weight > 0) == (partner >= 0)).all() and (weight <= 0.5).all()


SLOW = {"num": 32, "chunk": 4, "sampler": "ddpm", "nfe": None}  # 1000 steps: ~0.4 s a chunk
BASELINE = {"from_noise": True, "potential": None}  # no map: no shard actors to start


@pytest.fixture(scope="module")
def slow_problem(tmp_path_factory):
    """A problem whose chunks take long enough to kill workers mid-run, and ``reference(**kw)``:
    its in-process output, which every distributed run must reproduce exactly."""
    root = tmp_path_factory.mktemp("slow")
    problem = make_problem(root, n=30, step=999)
    cache: dict = {}

    def reference(**kw):
        key = tuple(sorted(kw))
        if key not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            out = str(root / f"reference-{len(cache)}")
            run_sample(config({**problem, **kw}, out, **SLOW))
            torch.set_num_threads(threads)
            cache[key] = read_samples(out)[1]
        return cache[key]

    return problem, reference


@pytest.mark.slow
def test_ray_workers_survive_a_killed_process(tmp_path, slow_problem, ray_local):
    problem, reference = slow_problem
    out = tmp_path / "samples"
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(run_sample(config(problem, str(out), workers=2, **SLOW)))
    )
    run.start()
    _wait_for_chunks(out, run)
    os.kill(storage.read_json(str(out / WORKERS))["pids"][0], signal.SIGKILL)
    run.join(timeout=120)
    assert result["written"] == 32 and not result["complete"]
    _, table = read_samples(str(out))
    assert table.equals(reference())


def test_ray_run_killed_then_rerun_yields_each_sample_once(tmp_path, slow_problem, ray_local):
    problem, reference = slow_problem
    problem = {**problem, **BASELINE}
    out = tmp_path / "samples"
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_sample(config(problem, str(out), workers=2, **SLOW))
        except BaseException as e:
            errors.append(e)

    run = threading.Thread(target=target)
    run.start()
    _wait_for_chunks(out, run)
    for name in storage.read_json(str(out / WORKERS))["actors"]:
        ray_local.kill(ray_local.get_actor(name), no_restart=True)
    run.join(timeout=120)
    assert len(errors) == 1 and "every sample worker died" in str(errors[0])
    done = written_chunks(str(out))
    assert 1 <= len(done) < 8 and not storage.is_success(str(out))
    s = run_sample(config(problem, str(out), workers=2, **SLOW))
    assert s["chunks_written"] == 8 - len(done)
    _, table = read_samples(str(out))
    ids = table.column("sample_id").to_numpy()
    assert len(ids) == 32 and len(np.unique(ids)) == 32
    assert table.equals(reference(**BASELINE))


def _wait_for_chunks(out: Path, run: threading.Thread) -> None:
    """Return once the run has written a chunk (and its workers.json)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.is_alive():
        if (out / WORKERS).exists() and written_chunks(str(out)):
            return
        time.sleep(0.005)
    raise AssertionError("the run wrote no chunk")


def test_s3_output(tmp_path, s3_bucket):
    problem = make_problem(tmp_path)
    out = f"{s3_bucket}/runs/samples"
    s = run_sample(config(problem, out))
    assert s["written"] == 50
    m, table = read_samples(out)
    assert table.num_rows == 50 and m["files"] == [chunk_name(c) for c in range(4)]
    assert written_chunks(out) == {0, 1, 2, 3}
    again = run_sample(config(problem, out))
    assert again["complete"] and again["written"] == 0


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_cli_from_noise_baselines(tmp_path, capsys, sampler):
    problem = make_problem(tmp_path)
    out = str(tmp_path / "baseline")
    argv = ["sample", "--from-noise", "--sampler", sampler, "--nfe", "6"]
    argv += ["--model", problem["model"], "--num", "10", "--out", out, "--schedule", "vp-linear"]
    assert cli.main(argv) == 0
    assert "wrote 10 samples" in capsys.readouterr().out
    m, table = read_samples(out)
    assert m["nfe"] == 6 and m["from_noise"] and m["map"] is None and m["data_shape"] == [4]
    assert (table.column("ot_index").to_numpy() == -1).all()
    assert cli.main(argv) == 0
    assert "already complete" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    problem = make_problem(tmp_path)
    argv = ["sample", "--targets", problem["targets"], "--model", problem["model"]]
    argv += ["--num", "5", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpmot sample: error:") and "--potential" in err and "\n" not in err
    argv += ["--potential", str(tmp_path / "absent")]
    assert cli.main(argv) == 2
    assert "not a finished fit output" in capsys.readouterr().err


def _decode_png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_diffusers_unet_baseline_writes_png(tmp_path):
    folder = tmp_path / "unet"
    tiny_unet().save_pretrained(str(folder))
    out = str(tmp_path / "samples")
    cfg = SampleConfig(
        model=f"diffusers:{folder}",
        num=5,
        chunk=3,
        out=out,
        from_noise=True,
        sampler="ddim",
        nfe=3,
        schedule="vp-linear",
    )
    s = run_sample(cfg)
    assert s["written"] == 5 and s["nfe"] == 3
    m, table = read_samples(out)
    assert m["data_shape"] == [3, 8, 8] and m["png"] and m["png_range"] == [-1.0, 1.0]
    x = np.stack(table.column("x").to_numpy(zero_copy_only=False))
    assert x.shape == (5, 192) and np.isfinite(x).all()
    img = _decode_png(table.column("png")[0].as_py())
    assert img.size == (8, 8) and img.mode == "RGB"
    pixels = np.asarray(img).transpose(2, 0, 1).astype(np.float64)
    expect = np.clip(np.rint((x[0].reshape(3, 8, 8) + 1) * 127.5), 0, 255)
    np.testing.assert_array_equal(pixels, expect)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_model_refines_image_targets(tmp_path):
    problem = make_problem(tmp_path, n=20, step=10, shape=(1, 8, 8))
    path = tmp_path / "halve.pt"
    torch.jit.save(torch.jit.script(Halve()), str(path))
    problem["model"] = f"torchscript:{path}"
    out = str(tmp_path / "samples")
    s = run_sample(config(problem, out, num=7, chunk=4, nfe=4))
    assert s["written"] == 7 and s["nfe"] == 4
    m, table = read_samples(out)
    assert m["data_shape"] == [1, 8, 8] and table.column_names[-1] == "png"
    assert _decode_png(table.column("png")[6].as_py()).mode == "L"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_from_noise_with_a_torchscript_model_and_shape(tmp_path, capsys):
    path = tmp_path / "halve.pt"
    torch.jit.save(torch.jit.script(Halve()), str(path))
    out = str(tmp_path / "samples")
    argv = ["sample", "--from-noise", "--sampler", "ddim", "--nfe", "2", "--shape", "1,8,8"]
    argv += ["--model", f"torchscript:{path}", "--num", "3", "--out", out, "--schedule", "ve"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    m, table = read_samples(out)
    assert m["data_shape"] == [1, 8, 8] and m["nfe"] == 2 and m["schedule"]["kind"] == "ve"
    assert _decode_png(table.column("png")[0].as_py()).size == (8, 8)


def test_model_shape_mismatch_is_reported(tmp_path):
    problem = make_problem(tmp_path)
    other = tmp_path / "other.json"
    GaussianMixture(np.zeros((1, 3)), np.ones(1), np.ones(1)).save(str(other))
    problem["model"] = f"gmm:{other}"
    with pytest.raises(DpmotError, match="does not match the data"):
        run_sample(config(problem, str(tmp_path / "o")))
