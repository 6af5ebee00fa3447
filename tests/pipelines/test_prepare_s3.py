"""prepare (and fit) end to end on a real S3 endpoint: the moto server of ``conftest.py``."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpmot_dist import cli
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare

DENIED = "access denied (check AWS credentials / AWS_ENDPOINT_URL)"


def error_of(fn, *args) -> str:
    with pytest.raises(DpmotError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def put_npy(uri: str, x: np.ndarray) -> None:
    storage.save_npy(uri, x)


def put_parquet(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=3)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


@pytest.fixture
def ray_s3(s3_server: dict[str, str], ray_local):
    """Ray whose worker processes see the moto endpoint and test credentials.

    Workers inherit the environment of the moment the local cluster starts; when the session
    cluster started before the S3 variables were set, it is restarted with them.
    """
    ray = ray_local

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3_server["endpoint_url"]:
        ray.shutdown()
        ray.init(
            num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
    return ray


def test_prepare_s3_to_s3_then_fit(s3_bucket: str, ray_s3, tmp_path, rng) -> None:
    """Ray tasks read s3:// and write s3://; the result equals an in-process local run; then
    ``dpmot fit`` reads the targets from s3:// and writes h to s3://."""
    x = rng.integers(0, 256, size=(30, 3, 4, 4), dtype=np.uint8)
    data, out = f"{s3_bucket}/in/x.npy", f"{s3_bucket}/targets"
    put_npy(data, x)
    opts = dict(step=50, copies=2, seed=3, rows_per_part=8, schedule="vp-cosine")
    m = run_prepare(PrepareConfig(data=data, out=out, workers=2, **opts))
    assert storage.is_success(out) and m["n"] == 60 and len(m["parts"]) == 8
    assert m["data_shape"] == [3, 4, 4] and m["source"]["uri"] == data
    np.save(tmp_path / "x.npy", x)
    run_prepare(
        PrepareConfig(data=str(tmp_path / "x.npy"), out=str(tmp_path / "t"), workers=0, **opts)
    )
    np.testing.assert_array_equal(datasets.load_targets(out), datasets.load_targets(tmp_path / "t"))
    assert "pass --overwrite" in error_of(
        run_prepare, PrepareConfig(data=data, out=out, workers=0, **opts)
    )

    fit = importlib.util.find_spec("dpmot_dist.pipelines.fit")
    if fit is None or not hasattr(importlib.import_module("dpmot_dist.pipelines.fit"), "run_fit"):
        pytest.skip("dpmot_dist.pipelines.fit.run_fit not available yet")
    fit_out = f"{s3_bucket}/fit"
    argv = ["fit", "--targets", out, "--out", fit_out, "--iters", "20", "--workers", "2"]
    assert cli.main([*argv, "--log-every", "10", "--eval-samples", "4096"]) == 0
    h = storage.load_npy(f"{fit_out}/h.npy")
    assert h.shape == (60,) and np.isfinite(h).all()
    assert storage.is_success(fit_out)
    fit_manifest = storage.read_json(f"{fit_out}/_manifest.json")
    assert fit_manifest["step"] == 50 and fit_manifest["schedule"]["kind"] == "vp-cosine"


def test_s3_image_folder_and_parquet_in_process(s3_bucket: str, rng) -> None:
    imgs = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        storage.write_bytes_atomic(f"{s3_bucket}/imgs/c{i % 2}/{i}.png", images.encode_png(img))
    m = run_prepare(
        PrepareConfig(data=f"{s3_bucket}/imgs", out=f"{s3_bucket}/t1", step=5, workers=0)
    )
    assert m["data_shape"] == [3, 6, 6] and m["n"] == 5
    assert m["source"]["first_file"].endswith("c0/0.png")
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4)})
    put_parquet(f"{s3_bucket}/pq/part-0.parquet", table)
    m = run_prepare(PrepareConfig(data=f"{s3_bucket}/pq", out=f"{s3_bucket}/t2", step=5, workers=0))
    assert m["data_shape"] == [4] and datasets.load_targets(f"{s3_bucket}/t2").shape == (7, 4)


def test_s3_missing_object(s3_bucket: str) -> None:
    missing = f"{s3_bucket}/nothing/here.npy"
    cfg = PrepareConfig(data=missing, out=f"{s3_bucket}/o", step=5, workers=0)
    assert error_of(run_prepare, cfg) == f"{missing}: no such file or object"


# ---------------------------------------------------------------------------------------------
# Wrong credentials (moto checks signatures only while its IAM authentication is on)


def test_s3_wrong_credentials(s3_bucket: str, moto_user, rng) -> None:
    data = f"{s3_bucket}/in/x.npy"
    put_npy(data, rng.normal(size=(4, 3)).astype(np.float32))
    moto_user["switch_on"]("wrong-secret")
    cfg = PrepareConfig(data=data, out=f"{s3_bucket}/o", step=5, workers=0)
    message = error_of(run_prepare, cfg)
    assert message == f"{data}: {DENIED}"
