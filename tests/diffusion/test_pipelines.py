"""diffusers pipeline folders as users have them: DDPMPipeline, DiTPipeline, latent pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testlib import (
    save_ddpm_pipeline,
    save_dit_pipeline,
    tiny_class_unet,
    tiny_dit,
    tiny_unet,
    tiny_vae,
)

from dpmot_dist.diffusion.models import (
    coefficients,
    load_model,
    model_classes,
    pipeline_schedule,
    pipeline_vae,
)
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError

diffusers = pytest.importorskip("diffusers")


def test_ddpm_pipeline_gives_denoiser_betas_and_prediction(tmp_path):
    unet = tiny_unet()
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    folder = save_ddpm_pipeline(tmp_path / "ddpm", unet, prediction_type="v_prediction", **kw)
    spec = f"diffusers:{folder}"
    schedule = pipeline_schedule(spec)
    reference = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert schedule.kind == "vp-scaled-linear" and schedule.num_steps == 1000
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), 1e-6)
    model = load_model(spec, schedule)
    assert model.prediction == "v" and not model.conditional and model.data_shape == (3, 8, 8)
    assert pipeline_vae(spec) is None and not model_classes(spec).conditional
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        v = unet(x, t).sample
    a, s = coefficients(schedule, t, x)
    torch.testing.assert_close(model.eps(x, t), a * v + s * x, rtol=1e-5, atol=1e-5)


def test_dit_pipeline_is_class_conditional_and_returns_eps_channels(tmp_path):
    dit = tiny_dit(num_classes=5)
    folder = save_dit_pipeline(tmp_path / "dit", dit, tiny_vae())
    spec = f"diffusers:{folder}"
    assert model_classes(spec).conditional and model_classes(spec).rows == 6  # 5 + null
    assert pipeline_vae(spec) == f"{folder}/vae"
    model = load_model(spec, pipeline_schedule(spec))
    assert model.conditional and model.class_rows == 6 and model.data_shape == (4, 8, 8)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        out = dit(x, timestep=t, class_labels=y).sample
    assert out.shape[1] == 8  # learned Σ: the ε channels come first
    torch.testing.assert_close(model.eps(x, t, y), out[:, :4])
    with pytest.raises(DpmotError, match="needs labels"):
        model.eps(x, t)


def test_latent_pipeline_with_class_embeddings(tmp_path):
    unet = tiny_class_unet(num_class_embeds=4, channels=4)
    folder = save_ddpm_pipeline(tmp_path / "ldm", unet, tiny_vae())
    spec = f"diffusers:{folder}"
    assert pipeline_vae(spec) == f"{folder}/vae" and model_classes(spec).rows == 4
    model = load_model(spec, Schedule())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.tensor([3, 1])
    with torch.no_grad():
        expect = unet(x, t, class_labels=y).sample
    torch.testing.assert_close(model.eps(x, t, y), expect)


def test_unsupported_schedules_and_networks_are_one_line_errors(tmp_path):
    folder = save_ddpm_pipeline(tmp_path / "p", tiny_unet(), beta_schedule="sigmoid")
    with pytest.raises(DpmotError, match="beta_schedule 'sigmoid'"):
        pipeline_schedule(f"diffusers:{folder}")
    vae = tmp_path / "vae"
    tiny_vae().save_pretrained(str(vae))
    with pytest.raises(DpmotError, match="AutoencoderKL is not a supported denoiser"):
        load_model(f"diffusers:{vae}", Schedule())
