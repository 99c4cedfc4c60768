"""Shared test set-up: deterministic seeds, modest threading, GPU tests skipped without CUDA kernels."""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU parity tests run with `make test-gpu` on a GPU node)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """A bucket on a moto S3 server on 127.0.0.1, with the standard AWS env vars pointing at it (module scope)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        from arm_platform import storage

        storage.reset_clients()
        storage.s3_client().create_bucket(Bucket="arm-data")
        yield "arm-data"
    storage.reset_clients()
    server.stop()


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory):
    """512 train / 512 val real Fashion-MNIST images as local shards (the ingest writer)."""
    from arm_platform.data import fashion_mnist

    if fashion_mnist.find_root() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fm")
    fashion_mnist.prepare(str(out), limit_per_split=512)
    return str(out)
