"""perf_analyzer, Triton's own load generator (DESIGN.md fact 9): the one place that installs and
runs it, for the benchmarks and the tests.

perf_analyzer ships only in the tritonclient 2.40.0 wheel (data/bin/perf_analyzer); it needs Debian's
libb64-0d and libcudart.so.12 from pip's nvidia-cuda-runtime-cu12. Both wheels go to a side folder
(.tools/perf_analyzer) with `pip install --target`, never over the project's tritonclient.

    python -m bench.perf install
    python -m bench.perf run --url 127.0.0.1:8001 -c 1 -c 8      # against a running stack
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOOLS = PROJECT_ROOT / ".tools" / "perf_analyzer"
WHEELS = ("tritonclient==2.40.0", "nvidia-cuda-runtime-cu12")


class PerfError(RuntimeError):
    """perf_analyzer is missing, could not be installed, or failed; the message says which and why."""


def binary() -> Path:
    found = sorted(TOOLS.glob("tritonclient-*.data/data/bin/perf_analyzer")) + sorted(TOOLS.glob("bin/perf_analyzer"))
    if not found:
        raise PerfError(f"perf_analyzer is not installed in {TOOLS}; run `python -m bench.perf install`")
    return found[0]


def env() -> dict[str, str]:
    libs = [str(p) for p in TOOLS.glob("nvidia/cuda_runtime/lib")]
    out = dict(os.environ)
    out["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, out.get("LD_LIBRARY_PATH")]))
    return out


def install() -> Path:
    """The binary, installed into .tools/ on first use."""
    try:
        binary()
    except PerfError:
        TOOLS.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TOOLS),
                               *WHEELS], capture_output=True, text=True)
        if done.returncode != 0:
            raise PerfError(f"could not install {' '.join(WHEELS)} into {TOOLS}: {done.stderr[-1000:]}") from None
    path = binary()
    path.chmod(0o755)
    return path


def input_data(queries: list[dict], top_k: int | None = None) -> dict:
    """--input-data JSON for search_ranking with every query (perf_analyzer cycles through them);
    shapes without the batch dimension."""
    rows = []
    for q in queries:
        cands = [int(c) for c in q["candidate_ids"]]
        row = {"QUERY": [q["query"]], "CANDIDATE_IDS": {"content": cands, "shape": [len(cands)]}}
        if top_k is not None:
            row["TOP_K"] = [int(top_k)]
        rows.append(row)
    return {"data": rows}


def measure(url: str, concurrency: int, data: dict, protocol: str = "grpc", interval_ms: int = 3000,
            model: str = "search_ranking") -> dict:
    """One perf_analyzer run: {"concurrency", "throughput", "p50_ms", "p99_ms", "window_ms"}. Stabilizes
    on throughput and average latency within 100% (this machine is shared and noisy; p99 as the
    stability criterion rarely converges), at most 6 windows; one retry with a doubled window."""
    last = ""
    for window in (interval_ms, interval_ms * 2):
        with tempfile.TemporaryDirectory() as tmp:
            data_path, csv_path = Path(tmp) / "data.json", Path(tmp) / "out.csv"
            data_path.write_text(json.dumps(data))
            argv = [str(binary()), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data_path),
                    f"--concurrency-range={concurrency}", f"--measurement-interval={window}",
                    "--stability-percentage=100", "--max-trials=6", "-f", str(csv_path)]
            done = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=300)
            if done.returncode == 0 and csv_path.exists():
                row = next(csv.DictReader(csv_path.open()))
                return {"concurrency": concurrency, "throughput": float(row["Inferences/Second"]),
                        "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
                        "window_ms": window}
            last = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
    raise PerfError(f"perf_analyzer failed against {url} ({protocol}, concurrency {concurrency}): {last}")


def warmup(url: str, data: dict, protocol: str) -> None:
    """A short run so that the measured ones start warm; its result (or failure) is discarded."""
    try:
        measure(url, 1, data, protocol, 500)
    except PerfError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install perf_analyzer into .tools/perf_analyzer")
    run = sub.add_parser("run", help="measure search_ranking at a running endpoint")
    run.add_argument("--url", required=True, help="host:port of Triton's (or HAProxy's) gRPC or HTTP endpoint")
    run.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    run.add_argument("--export", type=Path, help="take the requests from this export's held-out set "
                                                 "(default: the latest export)")
    run.add_argument("-c", "--concurrency", type=int, action="append", help="repeatable (default: 1 and 8)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            print(f"perf_analyzer: {install()}")
            return 0
        from model_repository.build import latest_export_dir  # noqa: PLC0415 - only for `run`
        held = json.loads(((args.export or latest_export_dir()) / "heldout_queries.json").read_text())[:16]
        install()
        for c in args.concurrency or [1, 8]:
            r = measure(args.url, c, input_data(held), args.protocol)
            print(f"concurrency {c}: {r['throughput']:.1f} infer/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    except PerfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
