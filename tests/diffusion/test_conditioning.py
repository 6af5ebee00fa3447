"""Class-conditional denoisers: labels bound to a batch, classifier-free guidance, its NFE."""

from __future__ import annotations

import pytest
import torch

from dpmot_dist.diffusion.models import ClassConditioned, ModuleDenoiser
from dpmot_dist.diffusion.samplers import RowNoise, SamplerSpec, refine
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError


class LabelEcho:
    """A conditional denoiser whose ε̂(x, t, y) is y in every coordinate; it records its calls."""

    conditional = True

    def __init__(self) -> None:
        self.schedule, self.data_shape, self.calls = Schedule(), (2,), []

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        self.calls.append(y.clone())
        return y.to(x.dtype)[:, None].expand_as(x)


def test_guidance_is_the_cfg_combination_in_one_doubled_batch():
    model, y = LabelEcho(), torch.tensor([1, 3])
    guided = ClassConditioned(model, y, guidance=3.0, null_class=5)
    out = guided.eps(torch.zeros(2, 2), torch.tensor([10, 10]))
    # ε̂(∅) + s (ε̂(y) − ε̂(∅)) with ε̂(c) = c
    torch.testing.assert_close(out, (5 + 3.0 * (y - 5)).double()[:, None].expand(2, 2).float())
    assert len(model.calls) == 1 and model.calls[0].tolist() == [1, 3, 5, 5]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm-solver++"])
def test_refine_counts_two_evaluations_per_guided_step(sampler):
    spec = SamplerSpec(name=sampler, nfe=4)
    x = torch.zeros(2, 2)
    noise = RowNoise(0, [0, 1], (2,))
    plain_model, guided_model = LabelEcho(), LabelEcho()
    y = torch.tensor([0, 2])
    _, plain = refine(spec, ClassConditioned(plain_model, y), x, 20, noise)
    guided = ClassConditioned(guided_model, y, guidance=2.0, null_class=7)
    _, doubled = refine(spec, guided, x, 20, noise)
    assert doubled == 2 * plain and plain == len(plain_model.calls) == len(guided_model.calls)
    assert all(c.tolist() == [0, 2] for c in plain_model.calls)
    assert all(c.tolist() == [0, 2, 7, 7] for c in guided_model.calls)


def test_a_conditional_network_needs_labels():
    net = ModuleDenoiser(lambda x, t, y: x * 0, Schedule(), conditional=True)
    with pytest.raises(DpmotError, match="needs labels"):
        net.eps(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(DpmotError, match="null class"):
        ClassConditioned(net, torch.tensor([0]), guidance=2.0)
