"""``fit --by-label`` (one potential per class) and ``sample --labels`` / ``--per-label``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dpmot_dist.cli import main
from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.label_fit import class_cells, deal
from dpmot_dist.pipelines.sample import SampleConfig, run_sample

SIZES = {0: 3, 1: 6, 2: 1}  # class → targets (class 2: one target, a trivial problem)
FIT = {"iters": 150, "eval_samples": 50_000, "backend": "torch", "lattice": 0}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def problem(tmp_path: Path) -> dict:
    """Labelled 3-D targets, classes interleaved in target order, with a step and schedule."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(list(SIZES), list(SIZES.values())))
    y = rng.standard_normal((len(labels), 3)).astype(np.float32) + 2 * labels[:, None]
    extra = {"schedule": Schedule().to_dict(), "step": 5, "data_shape": [3]}
    uri = str(tmp_path / "targets")
    datasets.write_targets(uri, y, rows_per_part=4, extra=extra, labels=labels)
    mix = GaussianMixture(np.zeros((1, 3)), np.ones(1), np.ones(1))
    mix.save(str(tmp_path / "gmm.json"))
    return {"targets": uri, "y": y, "labels": labels, "model": f"gmm:{tmp_path / 'gmm.json'}"}


def test_each_class_potential_is_the_fit_of_that_class_alone(problem, tmp_path):
    out = tmp_path / "fit"
    result = run_fit(FitConfig(targets=problem["targets"], out=str(out), by_label=True, **FIT))
    h = np.load(out / "h.npy")
    assert h.shape == (10,) and np.array_equal(h, result.h)
    summary = json.loads((out / "_labels.json").read_text())["labels"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["by_label"] and manifest["classes"] == 3 and set(summary) == {"0", "1", "2"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["label"] for r in records} == {0, 1}  # class 2 has nothing to solve
    for c, idx in class_cells(problem["labels"]).items():
        assert summary[str(c)]["n"] == len(idx)
        if len(idx) == 1:
            assert h[idx] == 0.0
            continue
        alone = tmp_path / f"y{c}.npy"
        np.save(alone, problem["y"][idx])
        run_fit(FitConfig(targets=str(alone), out=str(tmp_path / f"fit{c}"), **FIT))
        np.testing.assert_allclose(h[idx], np.load(tmp_path / f"fit{c}" / "h.npy"), atol=1e-12)
        assert summary[str(c)]["evaluation"]["tv"] < 0.05


def test_ray_workers_give_the_same_potentials_and_samples(problem, tmp_path, ray_local):
    cfg = {"targets": problem["targets"], "by_label": True, **FIT, "iters": 30}
    local = run_fit(FitConfig(out=str(tmp_path / "a"), **cfg))
    ray = run_fit(FitConfig(out=str(tmp_path / "b"), workers=2, cpus_per_worker=0.5, **cfg))
    np.testing.assert_array_equal(local.h, ray.h)
    assert json.loads((tmp_path / "b" / "_workers.json").read_text())["pids"]
    common = {"targets": problem["targets"], "potential": str(tmp_path / "b")}
    common |= {"model": problem["model"], "labels": [0, 1], "num": 40, "chunk": 16}
    common |= {"sampler": "ddim", "nfe": 2, "backend": "torch"}
    run_sample(SampleConfig(**common, out=str(tmp_path / "s0")))
    run_sample(SampleConfig(**common, out=str(tmp_path / "s2"), workers=2, cpus_per_worker=0.5))
    t0, t2 = (datasets.read_samples(str(tmp_path / n))[1] for n in ("s0", "s2"))
    assert t0.column("label").to_pylist() == t2.column("label").to_pylist()
    assert t0.column("ot_index").to_pylist() == t2.column("ot_index").to_pylist()
    assert t0.column("x").to_pylist() == t2.column("x").to_pylist()


def test_deal_balances_the_largest_classes_first():
    assert deal({0: 5, 1: 3, 2: 3, 3: 1}, 2) == [[0, 3], [1, 2]]
    assert deal({0: 1}, 4) == [[0]]


def test_sample_maps_noise_only_into_the_chosen_classes_cells(problem, tmp_path):
    fit = str(tmp_path / "fit")
    run_fit(FitConfig(targets=problem["targets"], out=fit, by_label=True, **FIT))
    common = {"targets": problem["targets"], "potential": fit, "model": problem["model"]}
    common |= {"sampler": "ddim", "nfe": 1, "backend": "torch", "chunk": 500}
    run_sample(SampleConfig(**common, out=str(tmp_path / "one"), num=1200, labels=[1]))
    _, table = datasets.read_samples(str(tmp_path / "one"))
    ot, labels = table.column("ot_index").to_numpy(), table.column("label").to_numpy()
    assert (labels == 1).all() and (problem["labels"][ot] == 1).all()
    # class 1's potential gives each of its 6 cells 1/6 of the noise
    freq = np.bincount(ot, minlength=10)[problem["labels"] == 1] / len(ot)
    np.testing.assert_allclose(freq, 1 / 6, atol=0.04)
    interp = {"map": "interp", "k": 8, "angle": 180.0}  # only the class keeps partners out
    run_sample(SampleConfig(**common, out=str(tmp_path / "i"), num=50, labels=[1], **interp))
    plan = pq.read_table(tmp_path / "i" / "_plan" / "plan.parquet")
    partner = plan.column("partner").to_numpy()
    assert (partner >= 0).any() and (problem["labels"][partner[partner >= 0]] == 1).all()
    run_sample(SampleConfig(**common, out=str(tmp_path / "per"), per_label=4))
    m, table = datasets.read_samples(str(tmp_path / "per"))
    labels = table.column("label").to_numpy()
    assert m["num"] == 12 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (problem["labels"][table.column("ot_index").to_numpy()] == labels).all()
    run_sample(SampleConfig(**common, out=str(tmp_path / "two"), num=300, labels=[0, 2]))
    labels = datasets.read_samples(str(tmp_path / "two"))[1].column("label").to_numpy()
    assert set(labels) == {0, 2} and abs((labels == 0).mean() - 3 / 4) < 0.08  # histogram 3:1


def test_labels_need_a_by_label_potential(problem, tmp_path, capsys):
    out = tmp_path / "fit"
    run_fit(FitConfig(targets=problem["targets"], out=str(out), **{**FIT, "eval_samples": 0}))
    argv = ["sample", "--targets", problem["targets"], "--potential", str(out), "--labels", "1"]
    argv += ["--model", problem["model"], "--num", "5", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "need a potential of fit --by-label" in capsys.readouterr().err
    unlabelled = tmp_path / "y.npy"
    np.save(unlabelled, problem["y"])
    with pytest.raises(DpmotError, match="needs labelled targets"):
        run_fit(FitConfig(targets=str(unlabelled), out=str(tmp_path / "u"), by_label=True))
