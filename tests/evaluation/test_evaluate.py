"""``dpmot eval`` and the FID Inception network (random weights; no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpmot_dist.cli import main
from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.errors import DpmotError
from dpmot_dist.evaluation import inception, metrics
from dpmot_dist.evaluation.evaluate import EvalConfig, run_eval
from dpmot_dist.io import images, storage
from dpmot_dist.pipelines.chunks import chunk_table, write_table_atomic


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random-init FID Inception state dict saved as a file (the real loader reads it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return str(path)


def write_samples(folder, x: np.ndarray, chunk: int = 4) -> str:
    """A minimal finished samples data set holding x (B, *shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for c, a in enumerate(range(0, len(x), chunk)):
        ids = np.arange(a, min(a + chunk, len(x)))
        name = f"chunk-{c:05d}.parquet"
        table = chunk_table(ids, 0, np.full(len(ids), -1), 10, x[ids], png=False)
        write_table_atomic(str(folder / name), table)
        files.append(name)
    manifest = {"kind": "samples", "num": len(x), "chunk": chunk, "files": files}
    manifest["data_shape"] = list(x.shape[1:])
    storage.write_json_atomic(str(folder / "_manifest.json"), manifest)
    storage.mark_success(str(folder))
    return str(folder)


def test_inception_loads_and_gives_pool3_features(weights):
    model = inception.load_inception(weights)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f = inception.inception_features(model, x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    grey = inception.inception_features(model, x[:, :1])
    assert grey.shape == (2, 2048)


def test_inception_weights_from_the_environment(weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    monkeypatch.setenv(inception.WEIGHTS_ENV, weights)
    assert isinstance(inception.load_inception(), inception.FIDInceptionV3)
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    with pytest.raises(DpmotError, match=inception.WEIGHTS_ENV):
        inception.load_inception()


def test_inception_wrong_keys_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(DpmotError) as e:
        inception.load_inception(str(bad))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(DpmotError, match="junk.pth"):
        inception.load_inception(str(junk))


def test_fid_of_samples_against_their_own_statistics(tmp_path, weights, rng):
    x = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    samples = write_samples(tmp_path / "s", x, chunk=2)
    stats = tmp_path / "stats.npz"
    cfg = dict(inception=weights, batch=4)
    run_eval(EvalConfig(make_ref_stats=True, data=samples, out=str(stats), **cfg))
    report = run_eval(EvalConfig(samples=samples, ref_stats=str(stats), **cfg))
    assert report["fid_samples"] == 4
    assert abs(report["fid"]) < 1e-3
    # the same statistics from an image .npy (uint8 NHWC, as stored on disk)
    u8 = images.to_uint8(x, "minus1_1").transpose(0, 2, 3, 1)
    np.save(tmp_path / "images.npy", u8)
    stats2 = tmp_path / "stats2.npz"
    run_eval(
        EvalConfig(make_ref_stats=True, data=str(tmp_path / "images.npy"), out=str(stats2), **cfg)
    )
    a, b = np.load(stats), np.load(stats2)
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-4, atol=1e-5)


def test_fid_ray_actors_match_in_process(ray_local, tmp_path, weights, rng):
    x = rng.uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    samples = write_samples(tmp_path / "s", x, chunk=2)
    stats = tmp_path / "stats.npz"
    run_eval(EvalConfig(make_ref_stats=True, data=samples, out=str(stats), inception=weights))
    r = run_eval(
        EvalConfig(
            samples=samples, ref_stats=str(stats), inception=weights, workers=2, cpus_per_worker=0.5
        )
    )
    assert abs(r["fid"]) < 1e-3


def test_gmm_targets_and_classifier_metrics(tmp_path, rng):
    mix = GaussianMixture(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([0.01, 0.01]), [0.5, 0.5])
    mix.save(str(tmp_path / "gmm.npz"))
    targets = mix.sample(400, torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "targets.npy", targets)
    x = np.concatenate([targets[:5], np.array([[0.5, 0.0]] * 5, np.float32)])
    samples = write_samples(tmp_path / "s", x.astype(np.float32))

    class Logits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([-x[:, 0], x[:, 0] - 1], 1) * 20

    torch.jit.save(torch.jit.script(Logits()), str(tmp_path / "clf.pt"))
    out = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            "--samples",
            samples,
            "--gmm",
            str(tmp_path / "gmm.npz"),
            "--targets",
            str(tmp_path / "targets.npy"),
            "--classifier",
            str(tmp_path / "clf.pt"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["mode_mixture"] == 0.5  # the five points half-way between the modes
    assert r["memorisation"] == 0.5  # the five exact copies of targets
    assert r["classifier_mixture"]["0.4"] == 0.5 and r["classifier_mixture"]["0.1"] == 0.5


def test_bad_input_is_a_one_line_error(tmp_path, capsys, weights):
    assert main(["eval", "--samples", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a finished samples data set" in err
    samples = write_samples(tmp_path / "s", np.zeros((4, 3, 8, 8), np.float32))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    assert main(["eval", "--samples", samples, "--ref-stats", str(tmp_path / "bad.npz")]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "--samples is required" in capsys.readouterr().err


def test_frechet_of_reference_statistics_matches_metrics(rng):
    f = rng.standard_normal((50, 4))
    assert metrics.fid_from_features(f, f) == pytest.approx(0, abs=1e-8)
