"""Launch the real Triton server that ships in the nvidia-pytriton wheel (DESIGN.md fact 1).

The wheel's Python backend needs the stub for the running Python next to libtriton_python.so;
we build a backend directory of our own under the run dir (symlinks) instead of touching the
installed wheel.

The Python-backend stub embeds the *system* libpython3.11, and that embedded interpreter ignores
PYTHONPATH when it builds sys.path (measured: the variable is in os.environ, not in sys.path).
So we export PYTHONPATH (venv site-packages + project root) and every Python-backend model.py
starts with the two-line bootstrap below before importing numpy/onnxruntime:

    import os, sys
    sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

On an NGC Triton image the packages sit in the system Python and the bootstrap is a no-op.
"""
from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from control.local.admin_keys import ensure_admin_key
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    NotReady,
    http_ok,
    require_free_ports,
    start_ready,
)

PY_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"


def pytriton_root() -> Path:
    try:
        import pytriton  # noqa: PLC0415 - only needed to locate the binary
    except ImportError:
        raise ComponentError("triton", "nvidia-pytriton is not installed (it carries tritonserver); "
                                       "run `make install`") from None
    return Path(pytriton.__file__).parent


def server_binary() -> Path:
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def library_dir() -> Path:
    return pytriton_root().parent / "nvidia_pytriton.libs"


def prepare_backend_dir(run_dir: Path) -> Path:
    """`run_dir/triton_backends/python/` with the wheel's backend files and the matching stub."""
    src = pytriton_root() / "tritonserver" / "backends" / "python"
    stub = pytriton_root() / "tritonserver" / "python_backend_stubs" / PY_TAG / "triton_python_backend_stub"
    if not stub.exists():
        raise ComponentError("triton", f"no Python backend stub for Python {PY_TAG} in the pytriton wheel ({stub})")
    dst = Path(run_dir) / "triton_backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for item in list(src.iterdir()) + [stub]:
        if item.name == "__pycache__":
            continue
        link = dst / item.name
        if link.is_symlink() and link.resolve() == item.resolve():
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(item)
    return dst.parent


def triton_env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(library_dir()), env.get("LD_LIBRARY_PATH")]))
    project_root = str(Path(__file__).resolve().parent.parent)
    paths = [*site.getsitepackages(), project_root, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # One thread per onnxruntime/numpy call inside the stubs: Triton's instances give the parallelism.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return env


def triton_argv(repository: str | Path, http_port: int, grpc_port: int, metrics_port: int, run_dir: Path,
                admin_key: str | None = None, load_models: tuple[str, ...] | list[str] = ("*",),
                host: str = "127.0.0.1", extra_args: list[str] | None = None, log_verbose: int = 0,
                exit_timeout_s: int = 5) -> list[str]:
    argv = [
        str(server_binary()),
        f"--model-repository={repository}",
        f"--backend-directory={prepare_backend_dir(run_dir)}",
        "--model-control-mode=explicit",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=true", "--metrics-interval-ms=1000",
        # Non-strict readiness: /v2/health/ready means "the server takes requests" and does not
        # flip to 400 while sync loads a candidate version next to the live one. Strict readiness
        # made HAProxy, the poller and k8s probes pull a serving instance out during every sync
        # (measured by `drill bad-model`); model-level readiness is what sync checks itself.
        "--strict-readiness=false",
        f"--log-verbose={log_verbose}",
        # Default 30 s: `down` would wait that long for idle Python-backend models.
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    argv += [f"--load-model={m}" for m in load_models]
    if admin_key:
        # The repository API (load/unload/index) needs the key; clients never get it.
        argv += [f"--http-restricted-api=model-repository:admin-key={admin_key}",
                 f"--grpc-restricted-protocol=model-repository:admin-key={admin_key}"]
    argv += list(extra_args or [])
    return argv


def start_triton(name: str, repository: str | Path, http_port: int, grpc_port: int, metrics_port: int,
                 run_dir: Path, admin_key: str | None = None, load_models=("*",),
                 env_extra: dict[str, str] | None = None, ready_timeout: float = 60.0,
                 host: str = "127.0.0.1", extra_args: list[str] | None = None,
                 log_verbose: int = 0, meta: dict | None = None) -> ManagedProcess:
    """Start one Triton and wait until /v2/health/ready; on failure stop it and raise with its log.
    The admin key stays on Triton's command line only (the pid file records it redacted)."""
    require_free_ports(name, [(f"{what} port", host, port)
                              for what, port in (("HTTP", http_port), ("gRPC", grpc_port), ("metrics", metrics_port))])
    argv = triton_argv(repository, http_port, grpc_port, metrics_port, run_dir, admin_key, load_models, host,
                       extra_args, log_verbose)
    try:
        return start_ready(name, argv, Path(run_dir), lambda: http_ok(f"http://{host}:{http_port}/v2/health/ready"),
                           ready_timeout, "ready (/v2/health/ready); a model probably failed to load", log_lines=40,
                           env=triton_env(env_extra), secret_values=[admin_key or ""], meta=meta)
    except NotReady as e:
        raise ComponentError(name, "did not become ready", _interesting(e.log_tail)) from None


def start_instance(settings, instance, repository: str | Path, ready_timeout: float | None = None) -> ManagedProcess:
    """Start the Triton of a configured instance with its own admin key (generated on first start).
    The pid file records the instance and repository, so the supervisor can start it again."""
    return start_triton(instance.name, repository, instance.http_port, instance.grpc_port, instance.metrics_port,
                        settings.run_path, admin_key=ensure_admin_key(settings, instance),
                        ready_timeout=ready_timeout or settings.triton.startup_timeout_s, host=instance.host,
                        extra_args=settings.triton.extra_args, log_verbose=settings.triton.log_verbose,
                        meta={"kind": "triton", "instance": instance.name, "repository": str(repository)})


def _interesting(log: str) -> str:
    """Drop the CUDA/NVML/DCGM noise a CPU host always logs so the real error shows."""
    noise = ("CUDA", "NVML", "DCGM", "cuda", "GPU metrics", "pinned memory", "Pinned memory")
    return "\n".join(line for line in log.splitlines() if not any(n in line for n in noise))
