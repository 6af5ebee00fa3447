"""Our output folders as the ecosystem reads them, and folders of the earlier layout.

A targets and a samples folder must open as one Parquet data set in pyarrow, pandas, Ray Data
and DuckDB with exactly their rows (no manifest, plan or checkpoint read as data); folders
written with ``manifest.json`` / ``plan.parquet`` / ``checkpoints/`` still open in our verbs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from dpmot_dist.cli import main
from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.io import datasets, storage

N_ROWS, COPIES, NUM = 150, 2, 600


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """prepare (150 rows × 2 copies, 3 parts) → fit → sample --num 600 (3 chunks), via the CLI."""
    root = tmp_path_factory.mktemp("outputs")
    means = np.zeros((2, 3))
    means[0, 0], means[1, 0] = 1.0, -1.0
    mix = GaussianMixture(means, np.array([0.1, 0.1]), np.array([0.5, 0.5]))
    mix.save(str(root / "gmm.npz"))
    np.save(root / "x0.npy", mix.sample(N_ROWS, torch.Generator().manual_seed(0)).numpy())
    paths = {k: root / k for k in ("targets", "fit", "samples")}
    common = ["--workers", "0"]
    prepare = ["prepare", "--data", str(root / "x0.npy"), "--out", str(paths["targets"])]
    assert (
        main([*prepare, "--step", "20", "--copies", str(COPIES), "--rows-per-part", "100", *common])
        == 0
    )
    fit = ["fit", "--targets", str(paths["targets"]), "--out", str(paths["fit"]), "--iters", "3"]
    assert main([*fit, "--eval-samples", "0", "--checkpoint-every", "2", *common]) == 0
    sample = ["sample", "--targets", str(paths["targets"]), "--potential", str(paths["fit"])]
    sample += ["--model", f"gmm:{root / 'gmm.npz'}", "--num", str(NUM), "--chunk", "256"]
    assert (
        main([*sample, "--out", str(paths["samples"]), "--sampler", "ddim", "--nfe", "2", *common])
        == 0
    )
    return paths


def test_only_data_files_are_parquet(run):
    for key, prefix in (("targets", "part-"), ("samples", "chunk-")):
        parquet = sorted(p.name for p in run[key].rglob("*.parquet") if not _hidden(p, run[key]))
        assert parquet and all(name.startswith(prefix) for name in parquet)
        others = [p.name for p in run[key].iterdir() if p.suffix != ".parquet"]
        assert all(name.startswith("_") for name in others), others
    assert (run["samples"] / datasets.PLAN).exists() and (run["fit"] / datasets.CHECKPOINT).exists()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in path.relative_to(root).parts)


def test_pyarrow_dataset_reads_exact_rows(run):
    samples = pads.dataset(str(run["samples"])).to_table()
    assert samples.num_rows == NUM
    assert len(np.unique(samples.column("sample_id").to_numpy())) == NUM
    assert set(samples.column_names) == {"sample_id", "seed", "ot_index", "nfe", "x"}
    targets = pads.dataset(str(run["targets"])).to_table()
    assert targets.num_rows == N_ROWS * COPIES
    assert sorted(targets.column("index").to_numpy()) == list(range(N_ROWS * COPIES))
    assert targets.column_names == ["index", "y"]


def test_pandas_reads_exact_rows(run):
    pd = pytest.importorskip("pandas")
    samples = pd.read_parquet(run["samples"])
    assert len(samples) == NUM and samples["sample_id"].nunique() == NUM
    assert list(samples.columns) == ["sample_id", "seed", "ot_index", "nfe", "x"]
    targets = pd.read_parquet(run["targets"])
    assert len(targets) == N_ROWS * COPIES and targets["index"].is_unique
    assert len(targets["y"].iloc[0]) == 3


def test_duckdb_glob_reads_exact_rows(run):
    duckdb = pytest.importorskip("duckdb")
    glob = f"{run['samples']}/*.parquet"
    [(rows, distinct)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT sample_id) FROM read_parquet('{glob}')"
    ).fetchall()
    assert rows == distinct == NUM
    [(targets,)] = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{run['targets']}/*.parquet')"
    ).fetchall()
    assert targets == N_ROWS * COPIES


def test_ray_data_reads_exact_rows(ray_local, run):
    samples = ray_local.data.read_parquet(str(run["samples"]))
    assert samples.count() == NUM
    assert set(samples.schema().names) == {"sample_id", "seed", "ot_index", "nfe", "x"}
    ids = np.concatenate([b["sample_id"] for b in samples.iter_batches(batch_format="numpy")])
    assert len(np.unique(ids)) == NUM
    assert ray_local.data.read_parquet(str(run["targets"])).count() == N_ROWS * COPIES


def _to_earlier_layout(folder: Path) -> None:
    """Rename a folder's auxiliary files to the names of the earlier layout."""
    for name, legacy in datasets.LEGACY_NAMES.items():
        if (folder / name).exists():
            (folder / legacy).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(folder / name, folder / legacy)


def test_earlier_layout_folders_still_open(run, tmp_path):
    old = {k: tmp_path / k for k in run}
    for k in run:
        shutil.copytree(run[k], old[k])
        _to_earlier_layout(old[k])
    assert (old["targets"] / "manifest.json").exists() and (
        old["samples"] / "plan.parquet"
    ).exists()
    np.testing.assert_array_equal(
        datasets.load_targets(str(old["targets"])), datasets.load_targets(str(run["targets"]))
    )
    m, table = datasets.read_samples(str(old["samples"]))
    assert m["num"] == NUM and table.num_rows == NUM
    # sample: a rerun on an old-layout folder keeps its plan and writes only the missing chunk
    (old["samples"] / datasets.chunk_name(1)).unlink()
    (old["samples"] / storage.SUCCESS).unlink()
    cfg = m["config"]  # the same run (its fingerprint names the original inputs)
    args = ["sample", "--targets", cfg["targets"], "--potential", cfg["potential"]]
    args += ["--model", cfg["model"], "--num", str(NUM), "--chunk", "256", "--workers", "0"]
    assert main([*args, "--out", str(old["samples"]), "--sampler", "ddim", "--nfe", "2"]) == 0
    _, again = datasets.read_samples(str(old["samples"]))
    assert again.equals(datasets.read_samples(str(run["samples"]))[1])


def test_fit_resumes_from_an_earlier_layout_checkpoint(run, tmp_path):
    targets = str(run["targets"])
    common = ["fit", "--targets", targets, "--eval-samples", "0", "--workers", "0"]
    common += ["--calibrate", "off"]  # the same source in both runs (a timed choice may differ)
    out = tmp_path / "fit"
    assert main([*common, "--out", str(out), "--iters", "4", "--checkpoint-every", "2"]) == 0
    _to_earlier_layout(out)
    (out / storage.SUCCESS).unlink()
    assert (out / "checkpoints" / "latest.npz").exists()
    assert main([*common, "--out", str(out), "--iters", "6", "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*common, "--out", str(ref), "--iters", "6"]) == 0
    np.testing.assert_array_equal(np.load(out / "h.npy"), np.load(ref / "h.npy"))
