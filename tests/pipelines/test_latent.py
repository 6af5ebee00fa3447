"""Latent and class-conditional diffusion end to end: VAE decoding, labels through the OT map."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testlib import (
    Recorder,
    Zero,
    save_ddpm_pipeline,
    save_dit_pipeline,
    tiny_class_unet,
    tiny_dit,
    tiny_vae,
)

from dpmot_dist import cli
from dpmot_dist.diffusion.samplers import SamplerSpec
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.pipelines.chunks import ChunkJob, ChunkWriter
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_pixels(data: bytes) -> np.ndarray:
    """(C, H, W) uint8 of PNG bytes."""
    return np.asarray(Image.open(io.BytesIO(data))).transpose(2, 0, 1)


def write_zero_model(path: Path) -> str:
    torch.jit.save(torch.jit.script(Zero()), str(path))
    return f"torchscript:{path}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vae_round_trip_through_prepare_and_sample(tmp_path, rng):
    """encode in prepare, decode in sample = diffusers' own decode(encode(image))."""
    vae = tiny_vae(scaling_factor=0.7, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    pixels = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    prep = PrepareConfig(
        data=str(tmp_path / "images.npy"),
        out=str(tmp_path / "targets"),
        vae=str(tmp_path / "vae"),
        schedule="ve",
        sigma_min=1e-6,
        step=0,
        workers=0,
    )
    run_prepare(prep)
    np.save(tmp_path / "h.npy", np.zeros(4))
    out = tmp_path / "samples"
    cfg = SampleConfig(
        targets=prep.out,
        potential=str(tmp_path / "h.npy"),
        model=write_zero_model(tmp_path / "zero.pt"),
        num=4,
        chunk=3,
        sampler="ddim",
        nfe=1,
        out=str(out),
        backend="torch",
    )
    s = run_sample(cfg)
    m, table = datasets.read_samples(str(out))
    assert m["decoded"] and m["image_shape"] == [3, 16, 16] and m["data_shape"] == [4, 8, 8]
    assert s["decode_seconds"] > 0 and s["samples_per_s_without_decode"] > s["samples_per_s"]
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2) / 127.5 - 1).float()
    with torch.no_grad():
        direct = vae.decode(vae.encode(x).latent_dist.mean).sample.numpy()
    direct8 = np.clip(np.rint((direct + 1) * 127.5), 0, 255)
    for row in table.to_pylist():
        ours = png_pixels(row["png"]).astype(np.float64)
        i = row["ot_index"]
        assert ours.shape == (3, 16, 16)
        assert np.abs(ours - direct8[i]).max() <= 1  # the same decode, up to rounding
        err_ours = np.abs(ours - pixels[i].transpose(2, 0, 1)).mean()
        err_direct = np.abs(direct8[i] - pixels[i].transpose(2, 0, 1)).mean()
        assert err_ours == pytest.approx(err_direct, abs=0.05)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """A random-init FID Inception state dict in a file (the real loader reads it)."""
    from dpmot_dist.evaluation import inception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return str(path)


def labelled_problem(root: Path, n: int = 30, classes: int = 3) -> dict[str, str]:
    """Labelled flat targets (D = 4) at step 20, h = 0, and a recording conditional model."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, n)
    y = rng.standard_normal((n, 4)).astype(np.float32) + 3 * labels[:, None]
    extra = {"schedule": Schedule().to_dict(), "step": 20, "data_shape": [4]}
    datasets.write_targets(str(root / "targets"), y, extra=extra, labels=labels)
    storage.save_npy(str(root / "fit" / "h.npy"), np.zeros(n))
    storage.mark_success(str(root / "fit"))
    torch.jit.save(torch.jit.script(Recorder()), str(root / "rec.pt"))
    return {
        "targets": str(root / "targets"),
        "potential": str(root / "fit"),
        "model": f"torchscript:{root / 'rec.pt'}",
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_labels_reach_the_model_and_guidance_doubles_nfe(tmp_path):
    problem = labelled_problem(tmp_path)
    common = {"num": 12, "chunk": 5, "sampler": "ddim", "nfe": 3, "backend": "torch"}
    run_sample(SampleConfig(**problem, out=str(tmp_path / "s"), conditional=True, **common))
    m, table = datasets.read_samples(str(tmp_path / "s"))
    target_labels = datasets.load_target_labels(problem["targets"])
    rows = table.to_pylist()
    assert m["columns"][:4] == ["sample_id", "seed", "ot_index", "label"]
    assert m["labels"]["num_classes"] == 3 and m["labels"]["conditional"]
    assert all(r["label"] == target_labels[r["ot_index"]] for r in rows)
    assert {r["nfe"] for r in rows} == {3}
    guided = SampleConfig(
        **problem, out=str(tmp_path / "g"), conditional=True, guidance_scale=2.0, **common
    )
    run_sample(guided)
    gm, gtable = datasets.read_samples(str(tmp_path / "g"))
    assert set(gtable.column("nfe").to_pylist()) == {6} and gm["nfe"] == 6
    assert gm["null_class"] == 3 and gm["guidance_scale"] == 2.0  # DiT's convention: C
    assert gtable.column("label").to_pylist() == table.column("label").to_pylist()
    # the worker's model saw each sample's label, then the null class, at every step
    job = ChunkJob(
        out=str(tmp_path / "w"),
        model=problem["model"],
        prediction="eps",
        device="cpu",
        dtype="float32",
        schedule=Schedule().to_dict(),
        t_start=20,
        data_shape=(4,),
        sampler=SamplerSpec(name="ddim", nfe=3),
        from_noise=False,
        seed=0,
        png=False,
        batch=4,
        conditional=True,
        guidance=2.0,
        null_class=3,
    )
    writer = ChunkWriter(job)
    labels = np.array([2, 0, 1, 1, 2])
    x_start = np.zeros((5, 4), np.float32)
    stats = writer.write(0, np.arange(5), np.zeros(5, np.int64), x_start, labels)
    seen = [y.tolist() for y in writer.model.fn.seen]
    assert stats["nfe"] == 6 and len(seen) == 2 * 3  # two batches (4 + 1) × three steps
    assert seen[:3] == [[2, 0, 1, 1, 3, 3, 3, 3]] * 3 and seen[3:] == [[2, 3]] * 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_from_noise_draws_labels_from_the_targets_histogram(tmp_path):
    problem = labelled_problem(tmp_path, n=40)
    counts = datasets.read_targets_manifest(problem["targets"])["labels"]["counts"]
    common = {"targets": problem["targets"], "model": problem["model"], "conditional": True}
    common |= {"from_noise": True, "sampler": "ddim", "nfe": 2, "num": 600}
    run_sample(SampleConfig(**common, out=str(tmp_path / "a"), chunk=256))
    run_sample(SampleConfig(**common, out=str(tmp_path / "b"), chunk=100))
    a = datasets.read_samples(str(tmp_path / "a"))[1].column("label").to_numpy()
    b = datasets.read_samples(str(tmp_path / "b"))[1].column("label").to_numpy()
    np.testing.assert_array_equal(a, b)  # a sample's label depends on (seed, sample_id) only
    freq = np.bincount(a, minlength=3) / len(a)
    np.testing.assert_allclose(freq, np.array(counts) / sum(counts), atol=0.06)


class Brightness(torch.nn.Module):
    """A TorchScript classifier of two classes: dark images (class 0) and bright ones (1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(x.shape[0], -1).mean(1)
        return torch.stack([-m, m], 1) * 50


def labelled_images(root: Path, rng) -> Path:
    """16×16 RGB PNGs in class subfolders: ``dark`` (class 0) and ``light`` (class 1)."""
    for name, (lo, hi), k in (("dark", (0, 60), 3), ("light", (190, 256), 2)):
        (root / name).mkdir(parents=True)
        for i in range(k):
            pixels = rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(images.encode_png(pixels))
    return root


def run_cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_labelled_images_to_decoded_conditional_samples_and_their_fid(
    tmp_path, rng, inception_weights, kind, capsys
):
    """PNG class folders → prepare --vae → fit → sample (decode) → eval, with a class-conditional
    latent UNet pipeline or a DiT pipeline, through the command line."""
    data = labelled_images(tmp_path / "data", rng)
    vae = tiny_vae()
    if kind == "unet":
        pipeline = save_ddpm_pipeline(tmp_path / "pipe", tiny_class_unet(3, channels=4), vae)
    else:
        pipeline = save_dit_pipeline(tmp_path / "pipe", tiny_dit(num_classes=2), vae)
    targets, fit, out = (str(tmp_path / n) for n in ("targets", "fit", "samples"))
    prepare = ["prepare", "--data", str(data), "--vae", pipeline, "--step", "50", "--workers", "0"]
    run_cli(*prepare, "--out", targets)
    m = datasets.read_targets_manifest(targets)
    assert m["data_shape"] == [4, 8, 8] and m["labels"]["classes"] == ["dark", "light"]
    run_cli("fit", "--targets", targets, "--out", fit, "--iters", "5", "--eval-samples", "0")
    sample = [
        "sample",
        "--targets",
        targets,
        "--potential",
        fit,
        "--model",
        f"diffusers:{pipeline}",
    ]
    sample += [
        "--num",
        "6",
        "--chunk",
        "4",
        "--sampler",
        "ddim",
        "--nfe",
        "2",
        "--backend",
        "torch",
    ]
    run_cli(*sample, "--out", out, "--guidance-scale", "1.5")
    assert "samples/s without it" in capsys.readouterr().out
    sm, table = datasets.read_samples(out)
    assert sm["decoded"] and sm["image_shape"] == [3, 16, 16] and sm["null_class"] == 2
    target_labels = datasets.load_target_labels(targets)
    for row in table.to_pylist():
        assert png_pixels(row["png"]).shape == (3, 16, 16)  # the data's size, decoded
        assert row["label"] == target_labels[row["ot_index"]] and row["nfe"] == 4
    if kind == "dit":  # the baseline from noise: labels chosen, schedule and VAE from the pipeline
        base = str(tmp_path / "base")
        run_cli(
            "sample", "--from-noise", "--model", f"diffusers:{pipeline}", "--labels", "0,1",
            "--per-label", "2", "--sampler", "ddim", "--nfe", "2", "--out", base,
        )  # fmt: skip
        bm, btable = datasets.read_samples(base)
        assert bm["decoded"] and bm["schedule"]["kind"] == "vp-linear"
        assert btable.column("label").to_pylist() == [0, 0, 1, 1]
        assert all(png_pixels(b).shape == (3, 16, 16) for b in btable.column("png").to_pylist())
    torch.jit.save(torch.jit.script(Brightness()), str(tmp_path / "clf.pt"))
    report = tmp_path / "report.json"
    evaluate = ["eval", "--samples", out, "--classifier", str(tmp_path / "clf.pt")]
    if kind == "unet":  # one FID suffices (its 2048² matrix square root takes ~20 s on 2 cores)
        stats = str(tmp_path / "stats.npz")
        common = ["--inception", inception_weights, "--batch", "8"]
        run_cli("eval", "--make-ref-stats", "--data", str(data), "--out", stats, *common)
        evaluate += ["--ref-stats", stats, *common]
    run_cli(*evaluate, "--out", str(report))
    r = json.loads(report.read_text())
    assert kind == "dit" or (r["fid_samples"] == 6 and np.isfinite(r["fid"]) and r["fid"] > 0)
    classifier = Brightness()
    pixels = np.stack([png_pixels(b) for b in table.column("png").to_pylist()])
    predicted = classifier(torch.from_numpy(pixels / 127.5 - 1).float()).argmax(1).numpy()
    labels = table.column("label").to_numpy()
    assert r["label_fidelity"] == pytest.approx(np.mean(predicted == labels))
    assert r["label_fidelity_per_class"] == {
        str(c): pytest.approx(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)
    }


def test_sample_help_documents_decode_guidance_and_labels(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--vae", "--guidance-scale", "--null-class", "--labels", "--per-label"):
        assert flag in text
    assert "decodes latent samples to images" in text and "classifier-free guidance" in text
    assert "only these classes" in text
