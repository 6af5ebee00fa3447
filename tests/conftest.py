"""Shared fixtures: a seeded generator and a real (moto) S3 server on 127.0.0.1; tests marked
``cuda`` skip where torch sees no GPU."""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Without CUDA the Triton kernel runs in its interpreter; set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` without a GPU (``pytest -m cuda`` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance metadata address
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
S3_ENV_REMOVED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION")


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator, so tests are reproducible."""
    return np.random.default_rng(0)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_s3fs_cache() -> None:
    """Forget cached S3FileSystem instances (they keep the credentials they were built with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real moto S3 server on 127.0.0.1 and the AWS variables pointing at it.

    Sets AWS_ENDPOINT_URL, test credentials and region for the session (restored at the
    end) and hides any user AWS config files; yields {"endpoint_url": ..., "region": ...}.
    """
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    no_config = str(Path(tmp_path_factory.mktemp("aws")) / "absent")
    with pytest.MonkeyPatch.context() as mp:
        for name in S3_ENV_REMOVED:
            mp.delenv(name, raising=False)
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_CONFIG_FILE", no_config)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", no_config)
        clear_s3fs_cache()
        try:
            yield {"endpoint_url": endpoint, "region": S3_ENV["AWS_DEFAULT_REGION"]}
        finally:
            clear_s3fs_cache()
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, str]) -> Iterator[str]:
    """A fresh, uniquely named bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    name = f"dpmot-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).create_bucket(Bucket=name)
    clear_s3fs_cache()
    yield f"s3://{name}"
    clear_s3fs_cache()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process local Ray cluster (token auth on, 127.0.0.1) shared by a test session.

    It starts after the S3 fixture, so that its workers inherit the AWS variables.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray cluster with a GPU for the module's tests: the session's cluster when one
    is running (left running), else one started here and shut down after the module.

    Skips without ray, without CUDA, or when Ray sees no GPU.
    """
    ray = pytest.importorskip("ray")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=4,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    try:
        if ray.cluster_resources().get("GPU", 0) < 1:
            pytest.skip("the Ray cluster has no GPU")
        yield ray
    finally:
        if started:
            ray.shutdown()


def _set_moto_auth(endpoint: str, count: str) -> None:
    """Turn moto's IAM authentication on ("0") or off ("inf")."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def moto_user(
    s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """An IAM user allowed everything; ``switch_on()`` turns moto's authentication on until
    the test ends (moto accepts any key while it is off)."""
    import boto3

    endpoint = s3_server["endpoint_url"]
    iam = boto3.client("iam", endpoint_url=endpoint)
    name = f"user-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]

    def switch_on(secret: str) -> None:
        _set_moto_auth(endpoint, "0")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        clear_s3fs_cache()

    try:
        yield {"name": name, "secret": key["SecretAccessKey"], "switch_on": switch_on}
    finally:
        _set_moto_auth(endpoint, "inf")
        clear_s3fs_cache()


# A short retry policy for tests that break the store on purpose: 1 s timeouts, up to 40
# retries 0.1–1 s apart (an outage of ~35 s is survived: a restarted server on a loaded
# machine can take that long to listen again).
FAULT_POLICY = {
    "DPMOT_IO_TIMEOUT": "1",
    "DPMOT_IO_RETRIES": "40",
    "DPMOT_IO_BACKOFF": "0.1",
    "DPMOT_IO_MAX_BACKOFF": "1",
}


@pytest.fixture
def moto_process(
    s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator:
    """A moto S3 server in a process of its own (``storefaults.MotoProcess``) that the test may
    pause, kill and bring back with its objects; AWS_ENDPOINT_URL points at it, the bucket
    ``faults`` exists (``proc.bucket``) and the retry policy is :data:`FAULT_POLICY`."""
    import boto3
    from storefaults import MotoProcess

    proc = MotoProcess(tmp_path)
    proc.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proc.endpoint)
    for name, value in FAULT_POLICY.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=proc.endpoint).create_bucket(Bucket="faults")
    proc.bucket = "s3://faults"
    clear_s3fs_cache()
    try:
        yield proc
    finally:
        proc.stop()
        clear_s3fs_cache()
