"""Shared fixtures: settings on free loopback ports with a run dir of the test's own, so tests
never collide with a running `make demo` stack or with each other."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port
from export.config import TINY


def gpu_available() -> bool:
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's server on a free loopback port: the AWS endpoint (Route53, Auto Scaling) of a test."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - deferred: pulls in boto3, botocore, moto

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """(settings, client): the project's S3 endpoint (moto's server, its own process) with its bucket,
    for a module's tests."""
    from control.adapters import s3 as s3x  # noqa: PLC0415 - deferred: pulls in boto3
    from control.local.s3_endpoint import start_s3_server  # noqa: PLC0415 - deferred: pulls in boto3

    settings = make_settings(tmp_path_factory.mktemp("s3") / "run")
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        yield settings, client
    finally:
        proc.stop()


@pytest.fixture
def settings_factory(tmp_path):
    return lambda **kw: make_settings(tmp_path / "run", **kw)


TINY_SEED = 1234


@pytest.fixture(scope="session")
def export_run(tmp_path_factory):
    """The tiny-profile export pipeline, run once per test session: (ExportResult, its base dir)."""
    from export.pipeline import run_export  # noqa: PLC0415 - deferred: pulls in torch, onnx, onnxruntime

    base = tmp_path_factory.mktemp("export")
    # The student's speed gate is a timing (x2 over the teacher, measured now): on a busy host it can
    # reject the student, and the serving tests need every variant's files. The gate's logic has its own
    # test (test_export.py); the session's export keeps the student whatever the machine's load.
    profile = TINY.with_gates(student_min_speedup=0.0)
    return run_export(profile, TINY_SEED, base / "exports", data_root=base / "data", progress=False), base


@pytest.fixture(scope="session")
def tiny_export(request):
    """The export dir every serving test uses: TRITON_HYBRID_TEST_EXPORT, else the session's run."""
    given = os.environ.get("TRITON_HYBRID_TEST_EXPORT")
    if given:
        return Path(given)
    return request.getfixturevalue("export_run")[0].path


@pytest.fixture(scope="session")
def cpu_repository(tiny_export, tmp_path_factory):
    """The CPU-target Triton repository built from the tiny export, once per session."""
    from model_repository.build import build_repository  # noqa: PLC0415 - deferred: pulls in tritonclient, grpc

    return build_repository(tiny_export, tmp_path_factory.mktemp("repository") / "cpu", "cpu").out_dir


class CallCounter:
    """Counts S3 API calls a client makes (PutObject, UploadPart, CopyObject ...)."""
    def __init__(self, client):
        self.calls: dict[str, int] = {}
        client.meta.events.register("before-call.s3.*", self._count)

    def _count(self, model, **_):
        self.calls[model.name] = self.calls.get(model.name, 0) + 1

    def __getitem__(self, name):
        return self.calls.get(name, 0)

    def reset(self):
        self.calls.clear()


@pytest.fixture
def s3_calls():
    """s3_calls(client) -> a counter of the S3 API calls that client makes from now on."""
    return CallCounter
