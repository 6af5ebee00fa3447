"""The sampler on a GPU (marked ``cuda``: skipped where torch sees none): a diffusers UNet in
fp16 on CUDA against the same run in fp32 on the CPU, in process and in a Ray actor holding a
GPU, and the OT map searched on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testlib import tiny_unet

from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.io import datasets, storage
from dpmot_dist.io.datasets import read_samples
from dpmot_dist.pipelines.sample import SampleConfig, run_sample

pytestmark = pytest.mark.cuda


@pytest.fixture
def unet(tmp_path) -> str:
    folder = tmp_path / "unet"
    tiny_unet().save_pretrained(str(folder))
    return f"diffusers:{folder}"


def samples(out) -> tuple[dict, np.ndarray]:
    manifest, table = read_samples(str(out))
    return manifest, np.stack(table.column("x").to_numpy(zero_copy_only=False))


def from_noise(model: str, out, **kw) -> SampleConfig:
    base = {"num": 64, "chunk": 32, "batch": 32, "sampler": "ddim", "nfe": 4}
    base.update(from_noise=True, schedule="vp-linear")
    return SampleConfig(model=model, out=str(out), **{**base, **kw})


def image_targets(root, n: int = 200, step: int = 300) -> tuple[str, str]:
    """Forward-diffused random 3×8×8 images at ``step`` and a finished potential h = 0."""
    rng = np.random.default_rng(0)
    sch = Schedule()
    x0 = torch.from_numpy(rng.uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32))
    y = sch.diffuse(x0, step, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    targets = str(root / "targets")
    extra = {"schedule": sch.to_dict(), "step": step, "data_shape": [3, 8, 8]}
    datasets.write_targets(targets, y.numpy(), rows_per_part=100, extra=extra)
    potential = str(root / "fit")
    storage.save_npy(storage.join(potential, "h.npy"), rng.normal(scale=0.1, size=n))
    storage.write_json_atomic(storage.join(potential, "_manifest.json"), {"source": "gaussian"})
    storage.mark_success(potential)
    return targets, potential


def test_fp16_unet_on_cuda_matches_fp32_on_cpu(unet, tmp_path):
    gpu = run_sample(from_noise(unet, tmp_path / "gpu", device="cuda", dtype="float16"))
    run_sample(from_noise(unet, tmp_path / "cpu", device="cpu", dtype="float32"))
    assert gpu["written"] == 64 and gpu["model_evals_per_s"] > 0
    m, x_gpu = samples(tmp_path / "gpu")
    _, x_cpu = samples(tmp_path / "cpu")
    assert m["nfe"] == 4 and np.isfinite(x_gpu).all()
    # same noise (drawn on the CPU), fp16 arithmetic: close, not equal (fp16 on the CPU is
    # within 5e-4 of the largest |x|; the random UNet's samples reach |x| ~ 700)
    assert np.abs(x_gpu - x_cpu).max() <= 1e-2 * np.abs(x_cpu).max()


def test_sampler_actor_on_a_gpu_matches_in_process(ray_gpu, unet, tmp_path):
    kw = {"device": "cuda", "dtype": "float16"}
    run_sample(from_noise(unet, tmp_path / "local", **kw))
    actor = run_sample(from_noise(unet, tmp_path / "actor", workers=1, **kw))
    assert actor["written"] == 64
    _, x_local = samples(tmp_path / "local")
    _, x_actor = samples(tmp_path / "actor")
    assert np.abs(x_actor - x_local).max() <= 1e-3 * np.abs(x_local).max()


def test_ot_map_on_cuda_picks_the_cpu_map_cells(unet, tmp_path):
    targets, potential = image_targets(tmp_path)
    common = {"targets": targets, "potential": potential, "model": unet, "num": 96}
    common.update(chunk=48, sampler="ddim", nfe=3)
    run_sample(SampleConfig(out=str(tmp_path / "gpu"), device="cuda", dtype="float16", **common))
    run_sample(SampleConfig(out=str(tmp_path / "cpu"), device="cpu", backend="torch", **common))
    _, gpu = read_samples(str(tmp_path / "gpu"))
    _, cpu = read_samples(str(tmp_path / "cpu"))
    assert np.array_equal(gpu.column("ot_index").to_numpy(), cpu.column("ot_index").to_numpy())
    assert (gpu.column("ot_index").to_numpy() >= 0).all()
