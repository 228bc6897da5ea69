"""perf_analyzer for `search_ranking` (DESIGN.md fact 9): install it into .tools/perf_analyzer and
run it at several concurrencies; prints throughput and p99 latency per concurrency.

perf_analyzer ships only in the tritonclient 2.40.0 wheel (data/bin/perf_analyzer); it needs
Debian's libb64-0d and libcudart.so.12 from pip's nvidia-cuda-runtime-cu12. Both wheels go to a side
folder with `pip install --target`, never over the project's tritonclient.

    python -m model_repository.perf install
    python -m model_repository.perf run --url 127.0.0.1:8001 --concurrency 1 8
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from control.config import load_config
from control.local.haproxy import start_haproxy
from control.local.procs import free_port
from control.local.triton_server import start_triton

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOOLS = PROJECT_ROOT / ".tools" / "perf_analyzer"
WHEELS = ("tritonclient==2.40.0", "nvidia-cuda-runtime-cu12")


def binary() -> Path:
    found = sorted(TOOLS.glob("tritonclient-*.data/data/bin/perf_analyzer")) + sorted(TOOLS.glob("bin/perf_analyzer"))
    if not found:
        raise click.ClickException(f"perf_analyzer is not installed in {TOOLS}; run `python -m model_repository.perf install`")
    return found[0]


def perf_env() -> dict[str, str]:
    libs = [str(p) for p in TOOLS.glob("nvidia/cuda_runtime/lib")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, env.get("LD_LIBRARY_PATH")]))
    return env


def install() -> Path:
    if not (any(TOOLS.glob("tritonclient-*.data/data/bin/perf_analyzer")) or (TOOLS / "bin" / "perf_analyzer").exists()):
        TOOLS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TOOLS), *WHEELS],
                       check=True)
    path = binary()
    path.chmod(0o755)
    return path


def input_data(query: str, candidate_ids: list[int], top_k: int | None = None) -> dict:
    """perf_analyzer's --input-data JSON for one search_ranking request (shapes without the batch dim)."""
    data = {"QUERY": [query], "CANDIDATE_IDS": {"content": [int(c) for c in candidate_ids],
                                                "shape": [len(candidate_ids)]}}
    if top_k is not None:
        data["TOP_K"] = [int(top_k)]
    return {"data": [data]}


def measure(url: str, concurrency: int, data: dict, protocol: str = "grpc", model: str = "search_ranking",
            interval_ms: int = 3000) -> dict:
    """One perf_analyzer run; {"concurrency", "throughput", "p50_ms", "p99_ms"}."""
    with tempfile.TemporaryDirectory() as tmp:
        data_path, csv_path = Path(tmp) / "data.json", Path(tmp) / "out.csv"
        data_path.write_text(json.dumps(data))
        argv = [str(binary()), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data_path),
                f"--concurrency-range={concurrency}", f"--measurement-interval={interval_ms}",
                "--percentile=99", "--stability-percentage=50", "--max-trials=10", "-f", str(csv_path)]
        done = subprocess.run(argv, capture_output=True, text=True, env=perf_env(), timeout=300)
        if done.returncode != 0:
            raise click.ClickException(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        row = next(csv.DictReader(csv_path.open()))
    return {"concurrency": concurrency, "throughput": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000}


@click.group()
def cli() -> None:
    """perf_analyzer against search_ranking."""


@cli.command("install")
def install_cmd() -> None:
    click.echo(f"perf_analyzer: {install()}")


@cli.command("run")
@click.option("--url", required=True, help="host:port of Triton's (or HAProxy's) gRPC or HTTP endpoint")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc")
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="take the request from this export's held-out set (default: the latest export)")
@click.option("--concurrency", "-c", type=int, multiple=True, default=(1, 8), show_default=True)
def run_cmd(url: str, protocol: str, export_dir: Path | None, concurrency: tuple[int, ...]) -> None:
    from model_repository.build import latest_export_dir  # noqa: PLC0415

    held = json.loads(((export_dir or latest_export_dir()) / "heldout_queries.json").read_text())[0]
    data = input_data(held["query"], held["candidate_ids"])
    for c in concurrency:
        r = measure(url, c, data, protocol)
        click.echo(f"concurrency {c}: {r['throughput']:.1f} infer/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")


def bench(export_dir: Path, work_dir: Path, concurrencies=(1, 8), protocol: str = "grpc",
          interval_ms: int = 4000, say=print) -> list[dict]:
    """Build the cpu repository with dynamic batching on and off; for each, one Triton behind
    HAProxy (the local stack's generated config), perf_analyzer through HAProxy."""
    from model_repository.build import build_repository  # noqa: PLC0415

    held = json.loads((Path(export_dir) / "heldout_queries.json").read_text())[0]
    data = input_data(held["query"], held["candidate_ids"])
    rows = []
    for batching in (True, False):
        run_dir = Path(work_dir) / ("batching_on" if batching else "batching_off")
        build = build_repository(export_dir, run_dir / "repo", "cpu", dynamic_batching=batching)
        settings = load_config(environ={}, overrides={
            "run_dir": str(run_dir / "run"),
            "haproxy": {"http_port": free_port(), "grpc_port": free_port(), "stats_port": free_port()},
            "instances": [{"name": "onprem-bench", "site": "onprem", "http_port": free_port(),
                           "grpc_port": free_port(), "metrics_port": free_port(), "weight": 100,
                           "sensitive_ok": True}]})
        inst = settings.instances[0]
        triton = start_triton(inst.name, build.out_dir, inst.http_port, inst.grpc_port, inst.metrics_port,
                              settings.run_path, ready_timeout=120)
        try:
            haproxy = _start_haproxy(settings)
            try:
                port = settings.haproxy.grpc_port if protocol == "grpc" else settings.haproxy.http_port
                for c in concurrencies:
                    r = measure(f"{settings.haproxy.host}:{port}", c, data, protocol, interval_ms=interval_ms)
                    r.update(dynamic_batching=batching, n_candidates=len(held["candidate_ids"]), via="haproxy",
                             protocol=protocol)
                    say(f"dynamic batching {'on ' if batching else 'off'} concurrency {c}: "
                        f"{r['throughput']:.1f} infer/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
                    rows.append(r)
            finally:
                haproxy.stop()
        finally:
            triton.stop()
    return rows


def _start_haproxy(settings):
    """The local stack's HAProxy, once its health checks have marked the Triton up (rise 2)."""
    proc = start_haproxy(settings)
    time.sleep(max(2.0, 3 * settings.haproxy.health_interval_ms / 1000))
    return proc


@cli.command("bench")
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".run/perf"),
              show_default=True)
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc")
@click.option("--concurrency", "-c", type=int, multiple=True, default=(1, 8), show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), help="also write the rows as JSON")
def bench_cmd(export_dir: Path | None, work_dir: Path, protocol: str, concurrency: tuple[int, ...],
              json_out: Path | None) -> None:
    """search_ranking through HAProxy, dynamic batching on vs off (starts its own Triton + HAProxy)."""
    from model_repository.build import latest_export_dir  # noqa: PLC0415

    install()
    shutil.rmtree(work_dir, ignore_errors=True)
    rows = bench(export_dir or latest_export_dir(), work_dir, concurrency, protocol, say=click.echo)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    cli()
