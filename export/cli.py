"""`triton-hybrid export` and `triton-hybrid export-bench` (wired into control/cli/__init__.py);
`python -m export.cli export|export-bench` runs them standalone."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .artifacts import latest_export
from .config import DEFAULT_SEED, get_profile
from .errors import ExportError

DEFAULT_OUT = "artifacts/exports"


@click.command("export")
@click.option("--profile", type=click.Choice(["tiny", "full"]), default="full", show_default=True,
              help="tiny: small data, seconds (tests); full: >=20k items, the issue's gates.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Export root; each export is a new <out>/<N>/ directory.")
@click.option("--seed", type=int, default=None, help="Data/training seed (default 1234).")
@click.option("--version", "version", type=int, default=None, help="Version number N (error if it exists).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where generated data lives (default <out>/../data); generated when absent, verified when present.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Load models from this checkpoint.pt instead of training.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def export_cmd(profile, out, seed, version, data_dir, checkpoint, no_progress):
    """Train, export to ONNX (FP32/INT8/student, TensorRT FP16 on GPU), check gates, write a new version."""
    from .pipeline import run_export  # noqa: PLC0415 - deferred: pulls in torch, onnx, onnxruntime

    # SIGTERM -> SystemExit, so the temporary export directory is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console()
    try:
        res = run_export(get_profile(profile), DEFAULT_SEED if seed is None else seed, Path(out), version,
                         data_dir, checkpoint, progress=not no_progress, console=console)
    except ExportError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    click.echo(str(res.path))


@click.command("export-bench")
@click.argument("export_dir", required=False, type=click.Path(file_okay=False))
@click.option("--root", default=DEFAULT_OUT, show_default=True, help="Export root (for the latest export).")
@click.option("--repeats", type=int, default=50, show_default=True)
@click.option("--candidates", type=int, default=50, show_default=True, help="Candidates per query for the ranker.")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
def export_bench_cmd(export_dir, root, repeats, candidates, threads, as_json):
    """onnxruntime latency/throughput: FP32 vs INT8 vs distilled student, batch 1 and 64."""
    from .bench import run_bench  # noqa: PLC0415 - deferred: pulls in torch, onnx, onnxruntime

    try:
        d = Path(export_dir) if export_dir else latest_export(root)
        rows = run_bench(d, repeats=repeats, n_candidates=candidates, threads=threads)
    except ExportError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    t = Table(title=f"onnxruntime CPU ({threads} thread(s)), {d}, ranker with {candidates} candidates")
    for c in ("model", "variant", "batch", "latency ms (median)", "throughput /s"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"], r["variant"], str(r["batch"]), f"{r['latency_ms']:.3f}", f"{r['throughput_per_s']:.0f}")
    Console().print(t)


@click.group()
def _main():
    """Export pipeline commands (standalone)."""


_main.add_command(export_cmd)
_main.add_command(export_bench_cmd)

if __name__ == "__main__":
    _main()
