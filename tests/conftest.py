"""Shared fixtures: settings on free loopback ports with a run dir of the test's own, so tests
never collide with a running `make demo` stack or with each other."""
from __future__ import annotations

import shutil

import pytest

from control.config import load_config
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
        overrides.setdefault(key, {}).update(value) if isinstance(value, dict) else overrides.__setitem__(key, value)
    return load_config(environ={}, overrides=overrides)


@pytest.fixture
def settings_factory(tmp_path):
    return lambda **kw: make_settings(tmp_path / "run", **kw)
