"""The denoiser contract and its adapters: exact mixture, TorchScript, diffusers UNet."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from testlib import Halve, tiny_unet

from dpmot_dist.diffusion.models import (
    GaussianMixture,
    GMMDenoiser,
    ModuleDenoiser,
    coefficients,
    load_model,
    to_score,
    to_x0,
)
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError

SCHEDULES = {"vp": Schedule(), "ve": Schedule(kind="ve")}


def small_mixture(d: int = 3) -> GaussianMixture:
    """Three components with distinct means, spreads and weights."""
    means = np.zeros((3, d))
    means[0, 0], means[1, 0], means[2, 1] = 2.0, -2.0, 1.5
    return GaussianMixture(means, np.array([0.2, 0.5, 0.3]), np.array([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("t", [0, 40, 500, 999])
def test_gmm_score_matches_autograd_of_log_density(kind, t, rng):
    sch = SCHEDULES[kind]
    mix = small_mixture()
    model = GMMDenoiser(mix, sch)
    a, s = sch.marginal(t)
    x = torch.from_numpy(a * mix.sample(16).double().numpy() + s * rng.normal(size=(16, 3)))
    x.requires_grad_(True)
    mix.log_prob(x, a, s).sum().backward()
    ts = torch.full((16,), t)
    score = to_score(model, x.detach(), ts)
    torch.testing.assert_close(score, x.grad, rtol=1e-7, atol=1e-9)
    x0 = to_x0(model, x.detach(), ts)
    torch.testing.assert_close(x0, (x.detach() + s * s * x.grad) / a, rtol=1e-7, atol=1e-9)


def test_gmm_log_prob_matches_scipy(rng):
    mix, a, s = small_mixture(), 0.8, 0.6
    x = rng.normal(size=(10, 3))
    dens = sum(
        w * multivariate_normal(a * m, (a * a * sd * sd + s * s) * np.eye(3)).pdf(x)
        for m, sd, w in zip(mix.means, mix.stds, mix.weights, strict=True)
    )
    np.testing.assert_allclose(mix.log_prob(torch.from_numpy(x), a, s).numpy(), np.log(dens))


def test_gmm_eps_per_row_timesteps():
    """Rows at different timesteps get their own (a_t, s_t)."""
    mix, sch = small_mixture(), Schedule()
    model = GMMDenoiser(mix, sch)
    x = torch.randn(4, 3)
    t = torch.tensor([3, 100, 600, 999])
    both = model.eps(x, t)
    for i in range(4):
        torch.testing.assert_close(both[i : i + 1], model.eps(x[i : i + 1], t[i : i + 1]))


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_gmm_save_load_and_spec(tmp_path, suffix):
    mix = small_mixture()
    path = str(tmp_path / f"mix{suffix}")
    mix.save(path)
    back = GaussianMixture.load(path)
    for name in ("means", "stds", "weights"):
        np.testing.assert_allclose(getattr(back, name), getattr(mix, name))
    model = load_model(f"gmm:{path}", Schedule())
    assert isinstance(model, GMMDenoiser) and model.data_shape == (3,)


def test_gmm_weights_are_normalised_and_sample_labels():
    mix = GaussianMixture(np.array([[-5.0], [5.0]]), np.array([0.1, 0.1]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(mix.weights, [0.25, 0.75])
    x = mix.sample(4000, torch.Generator().manual_seed(0))
    assert abs(float((mix.classify(x) == 1).double().mean()) - 0.75) < 0.03


def test_model_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"means": [[0.0]], "stds": [1.0]}))
    with pytest.raises(DpmotError, match="lacks key 'weights'"):
        load_model(f"gmm:{bad}", Schedule())
    with pytest.raises(DpmotError, match="stds positive"):
        GaussianMixture(np.zeros((1, 2)), np.array([0.0]), np.array([1.0]))
    with pytest.raises(DpmotError, match="expected gmm:FILE"):
        load_model("pickle:model.pt", Schedule())
    with pytest.raises(DpmotError, match="no such file"):
        load_model(f"gmm:{tmp_path / 'absent.npz'}", Schedule())
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(DpmotError, match="not a TorchScript module"):
        load_model(f"torchscript:{tmp_path / 'junk.pt'}", Schedule())


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_recover_eps(kind, prediction):
    """A network predicting v or x_0 exactly is seen as the exact ε."""
    sch = SCHEDULES[kind]
    exact = GMMDenoiser(small_mixture(), sch)

    def net(x, t):
        a, s = coefficients(sch, t, x)
        eps = exact.eps(x, t)
        x0 = (x - s * eps) / a
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]

    model = ModuleDenoiser(net, sch, prediction=prediction, dtype=torch.float64)
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.arange(8) * 100 + 50
    torch.testing.assert_close(model.eps(x, t), exact.eps(x, t))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("prediction", ["auto", "x0"])
def test_torchscript_model_loads_and_predicts(tmp_path, prediction):
    path = tmp_path / "halve.pt"
    torch.jit.save(torch.jit.script(Halve()), str(path))
    sch = Schedule()
    model = load_model(f"torchscript:{path}", sch, prediction=prediction)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    out = 0.5 * x + (t / 1000.0).reshape(-1, 1, 1, 1)
    if prediction == "x0":
        a, s = coefficients(sch, t, x)
        out = (x - a * out) / s
    torch.testing.assert_close(model.eps(x, t), out)
    assert model.data_shape is None


@pytest.mark.parametrize("where", ["local", "memory"])
def test_diffusers_unet_roundtrip(tmp_path, where):
    unet = tiny_unet()
    folder = tmp_path / "pipe"
    unet.save_pretrained(str(folder / "unet"))
    (folder / "scheduler").mkdir()
    sched = {"prediction_type": "v_prediction", **Schedule().ddpm_scheduler_kwargs()}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    uri = str(folder)
    if where == "memory":
        fs = fsspec.filesystem("memory")
        fs.put(str(folder), "/unet-test", recursive=True)
        uri = "memory://unet-test"
    sch = Schedule()
    model = load_model(f"diffusers:{uri}", sch)
    assert model.data_shape == (3, 8, 8) and model.prediction == "v"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        v = unet(x, t).sample
    a, s = coefficients(sch, t, x)
    torch.testing.assert_close(model.eps(x, t), a * v + s * x, rtol=1e-5, atol=1e-5)


def test_diffusers_missing_folder(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(DpmotError, match="no such folder"):
        load_model(f"diffusers:{tmp_path / 'absent'}", Schedule())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpmotError, match="cannot load a UNet2DModel"):
        load_model(f"diffusers:{tmp_path / 'empty'}", Schedule())
