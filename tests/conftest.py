"""Shared fixtures: settings on free loopback ports with a run dir of the test's own, so tests
never collide with a running `make demo` stack or with each other."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from control.config import DEFAULT_CONFIG, _deep_merge, load_config
from control.procs import free_port


def gpu_available() -> bool:
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_settings(run_dir, instances=(("onprem-1", "onprem", 90, True), ("cloud-1", "cloud", 10, False)),
                  **sections):
    """Settings for a stack of the test's own: every port free, everything under run_dir."""
    overrides = {
        "run_dir": str(run_dir),
        "s3": {"port": free_port()},
        "haproxy": {"http_port": free_port(), "grpc_port": free_port(), "stats_port": free_port()},
        "control": {"api_port": free_port(), "metrics_port": free_port()},
        "instances": [
            {"name": name, "site": site, "http_port": free_port(), "grpc_port": free_port(),
             "metrics_port": free_port(), "weight": weight, "sensitive_ok": sensitive}
            for name, site, weight, sensitive in instances
        ],
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            overrides.setdefault(key, {}).update(value)
        else:
            overrides[key] = value
    # Written to a file so that CLI calls and the daemon `up` starts (`--config`) see the same ports.
    data = _deep_merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), overrides)
    path = Path(run_dir).parent / f"config-{Path(run_dir).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's server on a free loopback port: the AWS endpoint (Route53, Auto Scaling) of a test."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def settings_factory(tmp_path):
    return lambda **kw: make_settings(tmp_path / "run", **kw)


TINY_SEED = 1234


@pytest.fixture(scope="session")
def export_run(tmp_path_factory):
    """The tiny-profile export pipeline, run once per test session: (ExportResult, its base dir)."""
    from export.config import TINY
    from export.pipeline import run_export

    base = tmp_path_factory.mktemp("export")
    return run_export(TINY, TINY_SEED, base / "exports", data_root=base / "data", progress=False), base


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
    from model_repository.build import build_repository

    return build_repository(tiny_export, tmp_path_factory.mktemp("repository") / "cpu", "cpu").out_dir
