"""``dpmot eval`` FID on image data sets: conventions named in reports and reference
statistics, colour modes of image folders, value ranges of float arrays (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import write_samples
from test_inception import random_fid_state

from dpmot_dist.cli import main
from dpmot_dist.errors import DpmotError
from dpmot_dist.evaluation.evaluate import EvalConfig, data_tasks, run_eval
from dpmot_dist.io import images


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random weights whose features carry the input (see test_inception)."""
    path = tmp_path_factory.mktemp("inception") / "random.pth"
    torch.save(random_fid_state(2), path)
    return str(path)


def stats_of(data: Path | str, out: Path, weights: str, **kw) -> dict:
    """Reference statistics of ``data`` (``--make-ref-stats``) as a dict of arrays."""
    run_eval(EvalConfig(make_ref_stats=True, data=str(data), out=str(out), inception=weights, **kw))
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def test_conventions_are_named_and_never_mixed(tmp_path: Path, weights, rng) -> None:
    x = rng.uniform(-1, 1, (3, 3, 12, 12)).astype(np.float32)
    samples = write_samples(tmp_path / "s", x, chunk=2)
    clean = stats_of(samples, tmp_path / "clean.npz", weights, fid_convention="clean-fid")
    assert str(clean["fid_convention"]) == "clean-fid"
    with pytest.raises(DpmotError) as e:  # the default convention against clean-fid statistics
        run_eval(EvalConfig(samples=samples, ref_stats=str(tmp_path / "clean.npz")))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'clean.npz'}: reference statistics of the clean-fid")
    assert "--fid-convention clean-fid" in message and "\n" not in message
    out = tmp_path / "report.json"
    args = ["eval", "--samples", samples, "--ref-stats", str(tmp_path / "clean.npz")]
    args += ["--inception", weights, "--fid-convention", "clean-fid", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["fid_convention"] == "clean-fid" and abs(report["fid"]) < 1e-3
    # statistics that do not say (pytorch-fid's and clean-fid's own files) are taken as given
    np.savez(tmp_path / "plain.npz", mu=clean["mu"], sigma=clean["sigma"])
    cfg = EvalConfig(samples=samples, ref_stats=str(tmp_path / "plain.npz"), inception=weights)
    r = run_eval(cfg)
    assert r["fid_convention"] == "pytorch-fid"
    assert r["fid"] > 1e-2  # pytorch-fid's features of the samples are not clean-fid's


def test_float_arrays_and_mixed_folders_give_the_uint8_statistics(
    tmp_path: Path, weights, rng
) -> None:
    """[0, 1] and [0, 255] float arrays, and PNG files with a grey one first, are the 8-bit
    images they hold: the same features as the uint8 array."""
    u8 = rng.integers(0, 256, (3, 10, 10, 3), dtype=np.uint8)
    u8[0] = u8[0, :, :, :1]  # a grey image, stored with three equal channels
    np.save(tmp_path / "u8.npy", u8)
    np.save(tmp_path / "unit.npy", u8.astype(np.float32) / 255)
    np.save(tmp_path / "255.npy", u8.astype(np.float64))
    folder = tmp_path / "png"
    folder.mkdir()
    (folder / "0.png").write_bytes(images.encode_png(u8[0, :, :, 0]))  # a grey PNG first
    for i in (1, 2):
        (folder / f"{i}.png").write_bytes(images.encode_png(u8[i]))
    ref = stats_of(tmp_path / "u8.npy", tmp_path / "u8.npz", weights)
    for data in ("unit.npy", "255.npy", "png"):
        got = stats_of(tmp_path / data, tmp_path / f"{data}.npz", weights)
        np.testing.assert_allclose(got["mu"], ref["mu"], rtol=1e-6, atol=1e-7, err_msg=data)


def test_float_range_options_of_eval(tmp_path: Path, rng) -> None:
    u8 = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", u8.astype(np.float32))
    (task,) = data_tasks(str(tmp_path / "x.npy"))  # recognised as [0, 255]
    np.testing.assert_array_equal(task.images(), u8.transpose(0, 3, 1, 2))
    (task,) = data_tasks(str(tmp_path / "x.npy"), scale="minus1_1")  # said to be [0, 1]
    with pytest.raises(DpmotError, match=r"x.npy \(rows 0..4\): float values in \[.*--scale"):
        task.images()
