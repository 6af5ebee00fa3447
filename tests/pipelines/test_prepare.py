"""dpmot_dist.pipelines.prepare (and its readers): inputs, forward diffusion, resume, errors."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpmot_dist import cli
from dpmot_dist.config import config_from_args
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.ot.sources import stream_seed
from dpmot_dist.pipelines.prepare import PLAN, PrepareConfig, run_prepare

# ---------------------------------------------------------------------------------------------
# Helpers


def config(data: str | Path, out: str | Path, **kw) -> PrepareConfig:
    """Options for a small in-process run (``workers=0`` unless given)."""
    kw = {"step": 100, "workers": 0, **kw}
    return PrepareConfig(data=str(data), out=str(out), **kw)


def expected_targets(x0: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """y[i·K + c] = a_M x0_i + s_M ε_{i,c}, each ε from its own stream (independent of prepare)."""
    a, s = cfg.make_schedule().marginal(cfg.step)
    x = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32).reshape(len(x0), -1))
    rows = []
    for i in range(len(x)):
        for c in range(cfg.copies):
            g = torch.Generator().manual_seed(stream_seed(cfg.seed, i, c))
            rows.append(a * x[i] + s * torch.randn(x.shape[1], generator=g))
    return torch.stack(rows).numpy()


def error_of(fn, *args, **kwargs) -> str:
    """The one-line message of the DpmotError that ``fn(*args, **kwargs)`` raises."""
    with pytest.raises(DpmotError) as info:
        fn(*args, **kwargs)
    assert type(info.value) is DpmotError
    message = str(info.value)
    assert "\n" not in message
    return message


def uint8_images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def minus1_1(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 127.5 - 1.0


def write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> None:
    pq.write_table(table, str(path), row_group_size=row_group_size)


def fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) → fixed_size_list<values>[D]."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def png_folder(root: Path, imgs: np.ndarray) -> Path:
    """Write (N, H, W, C) uint8 images as PNG files in two sub-folders, in sorted order."""
    for i, img in enumerate(imgs):
        sub = root / ("a" if i < len(imgs) // 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:03d}.png").write_bytes(images.encode_png(img))
    return root


def read_back(out: Path | str) -> tuple[dict, np.ndarray]:
    return datasets.read_targets_manifest(out), datasets.load_targets(out)


# ---------------------------------------------------------------------------------------------
# Forward diffusion


@pytest.mark.parametrize(("kind", "step"), [("vp-linear", 300), ("vp-cosine", 600), ("ve", 400)])
def test_diffusion_matches_closed_form(tmp_path: Path, kind: str, step: int) -> None:
    """Mean and variance over K copies of one point agree with (a_M x0, s_M²) to sampling error."""
    x0 = np.linspace(-1.0, 1.0, 6, dtype=np.float32)[None]
    np.save(tmp_path / "x.npy", x0)
    K = 4000
    cfg = config(tmp_path / "x.npy", tmp_path / "out", schedule=kind, step=step, copies=K)
    run_prepare(cfg)
    m, y = read_back(tmp_path / "out")
    sched = Schedule(kind=kind)
    if sched.is_vp:
        ab = sched.alphas_cumprod[step]
        a, var = np.sqrt(ab), 1.0 - ab
    else:
        a, var = 1.0, sched.sigmas[step] ** 2
    assert y.shape == (K, 6) and m["copies"] == K and m["source_rows"] == 1
    assert m["step"] == step and Schedule.from_dict(m["schedule"]) == sched
    mean_z = (y.mean(0) - a * x0[0]) / np.sqrt(var / K)
    var_z = (y.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (K - 1)))
    assert np.abs(mean_z).max() < 5, mean_z  # 5 standard errors per coordinate
    assert np.abs(var_z).max() < 5, var_z
    # copies are independent: off-diagonal sample correlations are within sampling error
    corr = np.corrcoef(y.T)[np.triu_indices(6, 1)]
    assert np.abs(corr).max() < 5 / np.sqrt(K)


def test_targets_follow_the_formula_and_row_order(tmp_path: Path, rng: np.random.Generator) -> None:
    x0 = rng.normal(size=(7, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x0)
    cfg = config(tmp_path / "x.npy", tmp_path / "out", copies=3, seed=11, rows_per_part=4)
    m = run_prepare(cfg)
    y = datasets.load_targets(tmp_path / "out")
    np.testing.assert_allclose(y, expected_targets(x0, cfg), rtol=1e-6, atol=1e-6)
    assert m["n"] == 21 and m["data_shape"] == [5] and m["row_order"].startswith("row = i")
    assert all(p["rows"] % 3 == 0 for p in m["parts"])  # a part holds whole groups of copies


def test_independent_of_workers_and_blocks(
    tmp_path: Path, rng: np.random.Generator, ray_local
) -> None:
    x0 = rng.normal(size=(23, 4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x0)
    runs = {
        "inline": dict(workers=0),
        "inline-small-blocks": dict(workers=0, rows_per_part=6),
        "ray3": dict(workers=3, rows_per_part=9),
    }
    ys = {}
    for name, kw in runs.items():
        cfg = config(tmp_path / "x.npy", tmp_path / name, copies=3, seed=5, **kw)
        m = run_prepare(cfg)
        ys[name] = datasets.load_targets(tmp_path / name)
        assert m["n"] == 69
    assert len(datasets.read_targets_manifest(tmp_path / "ray3")["parts"]) == 8  # 3 rows × 3 copies
    np.testing.assert_array_equal(ys["inline"], ys["inline-small-blocks"])
    np.testing.assert_array_equal(ys["inline"], ys["ray3"])
    np.testing.assert_allclose(ys["inline"], expected_targets(x0, cfg), rtol=1e-6, atol=1e-6)


def test_float16_storage(tmp_path: Path, rng: np.random.Generator) -> None:
    x0 = rng.normal(size=(4, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x0)
    cfg = config(tmp_path / "x.npy", tmp_path / "out", dtype="float16", schedule="ve", step=10)
    m = run_prepare(cfg)
    y = datasets.load_targets(tmp_path / "out")
    assert m["dtype"] == "float16"
    np.testing.assert_allclose(y, expected_targets(x0, cfg), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Input kinds


def _npy_nchw(tmp: Path, rng):
    x = uint8_images(rng, 9, (3, 8, 8))
    np.save(tmp / "x.npy", x)
    return tmp / "x.npy", minus1_1(x), [3, 8, 8], {}


def _npy_nhwc(tmp: Path, rng):
    x = uint8_images(rng, 9, (8, 6, 3))
    np.save(tmp / "x.npy", x)
    return tmp / "x.npy", minus1_1(x.transpose(0, 3, 1, 2)), [3, 8, 6], {}


def _npy_gray(tmp: Path, rng):
    x = uint8_images(rng, 5, (7, 7))
    np.save(tmp / "x.npy", x)
    return tmp / "x.npy", minus1_1(x[:, None]), [1, 7, 7], {}


def _npz(tmp: Path, rng):
    x = rng.uniform(size=(9, 8, 8, 3)).astype(np.float32)
    np.savez(tmp / "x.npz", images=x, labels=np.arange(9))
    expected = 2 * x.transpose(0, 3, 1, 2) - 1
    return tmp / "x.npz", expected, [3, 8, 8], {"column": "images", "scale": "minus1_1"}


def _npz_compressed(tmp: Path, rng):
    x = rng.normal(size=(9, 10)).astype(np.float64)
    np.savez_compressed(tmp / "x.npz", latents=x)
    return tmp / "x.npz", x.astype(np.float32), [10], {}


def _latents(tmp: Path, rng):
    x = rng.normal(size=(11, 16)).astype(np.float32)
    np.save(tmp / "z.npy", x)
    return tmp / "z.npy", x, [16], {}


def _parquet_list(tmp: Path, rng):
    x = rng.normal(size=(13, 12)).astype(np.float32)
    table = pa.table({"label": pa.array(np.arange(13)), "emb": fixed_list(x)})
    write_parquet(tmp / "x.parquet", table, row_group_size=4)
    return tmp / "x.parquet", x, [12], {}


def _parquet_folder_nested(tmp: Path, rng):
    x = rng.normal(size=(10, 2, 3)).astype(np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)
    folder = tmp / "pq"
    folder.mkdir()
    for k, (a, b) in enumerate([(0, 6), (6, 10)]):
        col = pa.FixedSizeListArray.from_arrays(inner[a * 2 : b * 2], 2)
        write_parquet(folder / f"f{k}.parquet", pa.table({"x": col}), row_group_size=3)
    (folder / "_SUCCESS").write_bytes(b"")
    return folder, x.reshape(10, 6), [6], {"layout": "flat"}


def _parquet_png(tmp: Path, rng):
    x = uint8_images(rng, 7, (8, 8, 3))
    table = pa.table(
        {
            "label": pa.array(np.arange(7)),
            "png": pa.array([images.encode_png(img) for img in x], type=pa.binary()),
        }
    )
    write_parquet(tmp / "x.parquet", table, row_group_size=3)
    return tmp / "x.parquet", minus1_1(x.transpose(0, 3, 1, 2)), [3, 8, 8], {}


def _parquet_hf_image(tmp: Path, rng):
    x = uint8_images(rng, 5, (6, 6))
    structs = [{"bytes": images.encode_png(img), "path": f"{i}.png"} for i, img in enumerate(x)]
    write_parquet(tmp / "x.parquet", pa.table({"image": pa.array(structs)}))
    return tmp / "x.parquet", minus1_1(x[:, None]), [1, 6, 6], {}


def _png_folder(tmp: Path, rng):
    x = uint8_images(rng, 8, (8, 10, 3))
    folder = png_folder(tmp / "imgs", x)
    return folder, minus1_1(x.transpose(0, 3, 1, 2)), [3, 8, 10], {}


INPUTS = {
    "npy-nchw-uint8": _npy_nchw,
    "npy-nhwc-uint8": _npy_nhwc,
    "npy-gray": _npy_gray,
    "npz-nhwc-float": _npz,
    "npz-compressed-latents": _npz_compressed,
    "npy-flat-latents": _latents,
    "parquet-fixed-list": _parquet_list,
    "parquet-folder-nested-list": _parquet_folder_nested,
    "parquet-png-bytes": _parquet_png,
    "parquet-hf-image-struct": _parquet_hf_image,
    "png-folder": _png_folder,
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_input_kinds_round_trip(tmp_path: Path, rng: np.random.Generator, kind: str) -> None:
    data, x0, shape, kw = INPUTS[kind](tmp_path, rng)
    cfg = config(data, tmp_path / "out", copies=2, rows_per_part=6, **kw)
    m = run_prepare(cfg)
    y = datasets.load_targets(tmp_path / "out")
    assert m["data_shape"] == shape and m["shape"] == shape
    assert m["source_rows"] == len(x0) and m["n"] == 2 * len(x0)
    np.testing.assert_allclose(y, expected_targets(x0, cfg), rtol=1e-5, atol=1e-5)


def test_file_uri_and_config_file(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    x = uint8_images(rng, 4, (3, 4, 4))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "p.yaml").write_text(
        f"prepare:\n  data: file://{tmp_path}/x.npy\n  out: file://{tmp_path}/out\n"
        "  schedule: vp-cosine\n  step: 50\n  workers: 0\n"
    )
    assert cli.main(["prepare", "--config", str(tmp_path / "p.yaml"), "--copies", "2"]) == 0
    assert "wrote 8 targets" in capsys.readouterr().out
    m = datasets.read_targets_manifest(tmp_path / "out")
    assert m["copies"] == 2 and m["schedule"]["kind"] == "vp-cosine" and m["step"] == 50
    cfg = PrepareConfig(**m["config"])
    np.testing.assert_allclose(
        datasets.load_targets(tmp_path / "out"), expected_targets(minus1_1(x), cfg), atol=1e-6
    )


def test_resize(tmp_path: Path, rng: np.random.Generator) -> None:
    """image_size: shorter side to the size, centre crop; mixed sizes are then allowed."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(8, 8), (12, 16), (16, 10)]):
        (folder / f"{i}.png").write_bytes(images.encode_png(uint8_images(rng, 1, (h, w, 3))[0]))
    m = run_prepare(config(folder, tmp_path / "a", image_size=4))
    assert m["data_shape"] == [3, 4, 4] and m["n"] == 3
    x = rng.normal(size=(2, 3, 12, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    m = run_prepare(config(tmp_path / "x.npy", tmp_path / "b", image_size=6))
    assert m["data_shape"] == [3, 6, 6]
    assert "image rows" in error_of(
        run_prepare, config(tmp_path / "x.npy", tmp_path / "c", image_size=6, layout="flat")
    )


# ---------------------------------------------------------------------------------------------
# Bad input


def _nan(tmp: Path, rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    x[7, 2] = np.nan
    np.save(tmp / "bad.npy", x)
    return tmp / "bad.npy", str(tmp / "bad.npy"), "NaN or Inf values (first at row 7)"


def _inf_parquet(tmp: Path, rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    x[5, 0] = np.inf
    folder = tmp / "pq"
    folder.mkdir()
    write_parquet(folder / "a.parquet", pa.table({"y": fixed_list(x[:4])}))
    write_parquet(folder / "b.parquet", pa.table({"y": fixed_list(x[4:])}))
    return folder, str(folder / "b.parquet"), "NaN or Inf values (first at row 1)"


def _mixed_png(tmp: Path, rng):
    folder = png_folder(tmp / "imgs", uint8_images(rng, 6, (8, 8, 3)))
    odd = folder / "b" / "img004.png"
    odd.write_bytes(images.encode_png(uint8_images(rng, 1, (8, 9, 3))[0]))
    return folder, str(odd), "mixed shapes"


def _mixed_parquet_lists(tmp: Path, rng):
    rows = [list(range(4)), list(range(4)), list(range(5))]
    write_parquet(tmp / "x.parquet", pa.table({"v": pa.array(rows, pa.list_(pa.float32()))}))
    return tmp / "x.parquet", f"{tmp / 'x.parquet'} (row 2)", "mixed shapes"


def _empty_npy(tmp: Path, rng):
    np.save(tmp / "e.npy", np.zeros((0, 3, 4, 4), np.uint8))
    return tmp / "e.npy", str(tmp / "e.npy"), "empty source"


def _empty_folder(tmp: Path, rng):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("nothing here")
    return tmp / "empty", str(tmp / "empty"), "empty source"


def _empty_parquet(tmp: Path, rng):
    write_parquet(tmp / "e.parquet", pa.table({"y": fixed_list(np.zeros((0, 3), np.float32))}))
    return tmp / "e.parquet", str(tmp / "e.parquet"), "empty source"


def _foreign_parquet(tmp: Path, rng):
    write_parquet(tmp / "f.parquet", pa.table({"a": [1, 2], "b": ["x", "y"]}))
    return tmp / "f.parquet", str(tmp / "f.parquet"), "foreign Parquet schema"


def _foreign_second_file(tmp: Path, rng):
    folder = tmp / "pq"
    folder.mkdir()
    write_parquet(folder / "a.parquet", pa.table({"y": fixed_list(np.ones((2, 3), np.float32))}))
    write_parquet(folder / "b.parquet", pa.table({"z": fixed_list(np.ones((2, 3), np.float32))}))
    return folder, str(folder / "b.parquet"), "foreign Parquet schema"


def _truncated_npy(tmp: Path, rng):
    np.save(tmp / "t.npy", rng.normal(size=(10, 8)).astype(np.float32))
    data = (tmp / "t.npy").read_bytes()
    (tmp / "t.npy").write_bytes(data[:-20])
    return tmp / "t.npy", str(tmp / "t.npy"), "corrupt or truncated npy"


def _truncated_npz(tmp: Path, rng):
    np.savez(tmp / "t.npz", x=rng.normal(size=(10, 8)))
    data = (tmp / "t.npz").read_bytes()
    (tmp / "t.npz").write_bytes(data[: len(data) // 2])
    return tmp / "t.npz", str(tmp / "t.npz"), "corrupt or truncated npz"


def _truncated_parquet(tmp: Path, rng):
    write_parquet(tmp / "t.parquet", pa.table({"y": fixed_list(np.ones((10, 3), np.float32))}))
    data = (tmp / "t.parquet").read_bytes()
    (tmp / "t.parquet").write_bytes(data[: len(data) - 30])
    return tmp / "t.parquet", str(tmp / "t.parquet"), "corrupt or truncated Parquet"


def _corrupt_parquet_pages(tmp: Path, rng):
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    write_parquet(tmp / "c.parquet", pa.table({"y": fixed_list(x)}), row_group_size=100)
    data = bytearray((tmp / "c.parquet").read_bytes())
    data[2000:6000] = b"x" * 4000  # the footer survives, data pages do not
    (tmp / "c.parquet").write_bytes(bytes(data))
    return tmp / "c.parquet", str(tmp / "c.parquet"), "corrupt or truncated Parquet"


def _truncated_png(tmp: Path, rng):
    folder = png_folder(tmp / "imgs", uint8_images(rng, 4, (16, 16, 3)))
    bad = folder / "b" / "img003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    return folder, str(bad), "not a readable PNG/JPEG image"


def _missing(tmp: Path, rng):
    return tmp / "nope.npy", str(tmp / "nope.npy"), "no such file or object"


def _object_dtype(tmp: Path, rng):
    buf = io.BytesIO()
    np.save(buf, np.array([[1 + 2j, 3j]]))
    (tmp / "c.npy").write_bytes(buf.getvalue())
    return tmp / "c.npy", str(tmp / "c.npy"), "not supported"


def _two_members(tmp: Path, rng):
    np.savez(tmp / "m.npz", a=np.ones((2, 3)), b=np.ones((2, 3)))
    return tmp / "m.npz", str(tmp / "m.npz"), "several arrays"


def _not_a_zip(tmp: Path, rng):
    with zipfile.ZipFile(tmp / "z.npz", "w") as zf:
        zf.writestr("x.npy", b"not an array")
    return tmp / "z.npz", str(tmp / "z.npz"), "corrupt or truncated npy"


BAD = {
    "nan": _nan,
    "inf-in-second-parquet-file": _inf_parquet,
    "mixed-png-sizes": _mixed_png,
    "mixed-list-lengths": _mixed_parquet_lists,
    "empty-npy": _empty_npy,
    "empty-folder": _empty_folder,
    "empty-parquet": _empty_parquet,
    "foreign-parquet": _foreign_parquet,
    "foreign-second-file": _foreign_second_file,
    "truncated-npy": _truncated_npy,
    "truncated-npz": _truncated_npz,
    "truncated-parquet": _truncated_parquet,
    "corrupt-parquet-pages": _corrupt_parquet_pages,
    "truncated-png": _truncated_png,
    "missing": _missing,
    "complex-dtype": _object_dtype,
    "ambiguous-npz": _two_members,
    "bad-npz-member": _not_a_zip,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    data, obj, problem = BAD[case](tmp_path, rng)
    message = error_of(run_prepare, config(data, tmp_path / "out", rows_per_part=2))
    assert message.startswith(f"{obj}:") and problem in message, message
    assert not storage.is_success(tmp_path / "out")


def test_task_errors_reach_the_user_as_one_line(
    tmp_path: Path, rng: np.random.Generator, ray_local, capsys
) -> None:
    """A DpmotError raised inside a Ray task is re-raised as itself, and the CLI prints it."""
    data, obj, _ = _mixed_png(tmp_path, rng)
    cfg = config(data, tmp_path / "out", rows_per_part=1, workers=2)
    assert error_of(run_prepare, cfg).startswith(f"{obj}: image is 9×8×3")
    argv = ["prepare", "--data", str(data), "--out", str(tmp_path / "o2"), "--step", "3"]
    assert cli.main([*argv, "--workers", "2", "--rows-per-part", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dpmot prepare: error: {obj}: image is 9×8×3")


def test_bad_options(tmp_path: Path, rng: np.random.Generator) -> None:
    np.save(tmp_path / "x.npy", uint8_images(rng, 2, (3, 4, 4)))
    with pytest.raises(ValueError, match="step 1000 outside"):
        config(tmp_path / "x.npy", tmp_path / "o", step=1000)
    np.save(tmp_path / "r.npy", np.ones((2, 2, 2, 2, 2), np.float32))
    assert "layout=flat" in error_of(run_prepare, config(tmp_path / "r.npy", tmp_path / "o"))
    (tmp_path / "x.txt").write_text("hello")
    assert "unsupported input" in error_of(run_prepare, config(tmp_path / "x.txt", tmp_path / "o"))


# ---------------------------------------------------------------------------------------------
# Output folder: overwrite protection, interruption and resume


def test_overwrite_protection(tmp_path: Path, rng: np.random.Generator) -> None:
    np.save(tmp_path / "x.npy", rng.normal(size=(6, 3)).astype(np.float32))
    out = tmp_path / "out"
    first = run_prepare(config(tmp_path / "x.npy", out, seed=1))
    before = (out / "part-00000.parquet").read_bytes()
    assert "pass --overwrite" in error_of(run_prepare, config(tmp_path / "x.npy", out, seed=2))
    assert (out / "part-00000.parquet").read_bytes() == before
    second = run_prepare(config(tmp_path / "x.npy", out, seed=2, overwrite=True))
    assert second["seed"] == 2 and first["seed"] == 1
    assert (out / "part-00000.parquet").read_bytes() != before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    msg = error_of(run_prepare, config(tmp_path / "x.npy", other))
    assert msg.startswith(str(other)) and "not a prepare output" in msg
    assert (other / "keep.txt").exists()


def test_interrupted_then_rerun(tmp_path: Path, rng: np.random.Generator, monkeypatch) -> None:
    from dpmot_dist.pipelines import prepare

    np.save(tmp_path / "x.npy", rng.normal(size=(20, 4)).astype(np.float32))
    out = tmp_path / "out"
    cfg = config(tmp_path / "x.npy", out, copies=2, rows_per_part=8)  # 5 parts of 4 rows × 2
    real = prepare.prepare_block

    def crash_on_part_3(source, t, out_uri, part_no, block):
        if part_no == 3:
            raise KeyboardInterrupt
        return real(source, t, out_uri, part_no, block)

    monkeypatch.setattr(prepare, "prepare_block", crash_on_part_3)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(cfg)
    assert not storage.is_success(out) and not (out / "_manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(written) == [f"part-0000{k}.parquet" for k in range(3)]
    monkeypatch.setattr(prepare, "prepare_block", real)
    (out / ".part-00003.parquet.tmp-dead").write_bytes(b"half")  # a killed writer's leftover
    m = run_prepare(cfg)
    assert storage.is_success(out) and m["n"] == 40
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[012].parquet")} == written
    assert not list(out.glob(".*tmp*"))
    x0 = np.load(tmp_path / "x.npy")
    np.testing.assert_allclose(datasets.load_targets(out), expected_targets(x0, cfg), atol=1e-6)

    # a lost marker and part: the rerun rewrites only that part
    os.remove(out / "_SUCCESS")
    os.remove(out / "part-00001.parquet")
    os.remove(out / "_manifest.json")
    keep = (out / "part-00004.parquet").stat().st_mtime_ns
    run_prepare(cfg)
    assert storage.is_success(out) and (out / "part-00004.parquet").stat().st_mtime_ns == keep
    np.testing.assert_allclose(datasets.load_targets(out), expected_targets(x0, cfg), atol=1e-6)

    # an unfinished run of other options is never silently mixed in
    os.remove(out / "_SUCCESS")
    msg = error_of(run_prepare, config(tmp_path / "x.npy", out, copies=3, rows_per_part=8))
    assert "unfinished prepare of other data or options" in msg
    assert json.loads((out / PLAN).read_text())["config"]["copies"] == 2


# ---------------------------------------------------------------------------------------------
# VAE latents


def test_vae_latents(tmp_path: Path, rng: np.random.Generator) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()
    vae.save_pretrained(tmp_path / "vae")
    x = uint8_images(rng, 5, (16, 16, 3))
    np.save(tmp_path / "x.npy", x)
    cfg = config(
        tmp_path / "x.npy",
        tmp_path / "out",
        vae=f"file://{tmp_path}/vae",
        vae_batch_size=2,
        copies=2,
    )
    m = run_prepare(cfg)
    assert m["data_shape"] == [4, 8, 8] and m["vae"]["scaling_factor"] == 0.5
    with torch.no_grad():
        pixels = torch.from_numpy(minus1_1(x.transpose(0, 3, 1, 2)))
        z = 0.5 * vae.encode(pixels).latent_dist.mean
    y = datasets.load_targets(tmp_path / "out")
    np.testing.assert_allclose(y, expected_targets(z.numpy(), cfg), rtol=1e-4, atol=1e-5)
    x_bad = uint8_images(rng, 2, (15, 15, 3))
    np.save(tmp_path / "bad.npy", x_bad)
    msg = error_of(
        run_prepare, config(tmp_path / "bad.npy", tmp_path / "o2", vae=str(tmp_path / "vae"))
    )
    assert "not a multiple" in msg


# ---------------------------------------------------------------------------------------------
# The job entrypoint and its example config


def _job_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "jobs" / "prepare.py"
    spec = importlib.util.spec_from_file_location("jobs_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parent / "configs" / "prepare.yaml"


def test_job_entrypoint_and_example_config(
    tmp_path: Path, rng: np.random.Generator, capsys
) -> None:
    job, example = _job_module()
    args = job.parse_args(["--config", str(example), "--data", "x", "--out", "y"])
    cfg = config_from_args(PrepareConfig, args, "prepare")  # every example key is valid
    assert cfg.schedule == "vp-linear" and cfg.image_size == 64 and cfg.data == "x"
    np.save(tmp_path / "x.npy", uint8_images(rng, 3, (3, 4, 4)))
    argv = ["--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"), "--step", "7"]
    assert job.main(job.parse_args([*argv, "--workers", "0", "--copies", "2"])) == 0
    assert "wrote 6 targets" in capsys.readouterr().out
    assert job.main(job.parse_args([*argv, "--workers", "0"])) == 2
    assert "pass --overwrite" in capsys.readouterr().err
