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
import subprocess
import sys
import tempfile
from pathlib import Path

import click

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
                "--percentile=99", "--stability-percentage=20", "--max-trials=5", "-f", str(csv_path)]
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


if __name__ == "__main__":
    cli()
