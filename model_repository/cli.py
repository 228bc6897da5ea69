"""`triton-hybrid repo ...`: build the Triton model repository from an export."""
from __future__ import annotations

from pathlib import Path

import click

from model_repository.spec import TARGETS


@click.group("repo")
def repo_group() -> None:
    """The Triton model repository (configs generated from model_repository/spec.py)."""


@repo_group.command("build")
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="cpu: ONNX through onnxruntime inside Python-backend models; gpu: onnxruntime backend "
                   "with TensorRT (or TensorRT plans), KIND_GPU instances.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Export to build from (default: the latest under artifacts/exports).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Repository root (default: model_repository/generated/<target>).")
@click.option("--version", type=click.IntRange(min=1), help="Version number for every model (default: the next one per model).")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True)
@click.option("--max-candidates", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Requests with more candidate ids are refused.")
@click.option("--max-query-chars", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longer queries are refused.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=10, show_default=True,
              help="top_k when the request gives none.")
def build_cmd(target: str, export_dir: Path | None, out_dir: Path | None, version: int | None,
              dynamic_batching: bool, max_candidates: int, max_query_chars: int, top_k: int) -> None:
    """Assemble the repository from an export: configs, Python-backend code, weights and data."""
    from model_repository.build import (  # noqa: PLC0415
        BuildError, build_repository, default_out_dir, latest_export_dir, spec_for_export,
    )

    try:
        export_dir = export_dir or latest_export_dir()
        spec = spec_for_export(export_dir, max_candidates=max_candidates, max_query_chars=max_query_chars,
                               top_k_default=top_k)
        result = build_repository(export_dir, out_dir or default_out_dir(target), target=target, version=version,
                                  spec=spec, dynamic_batching=dynamic_batching)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"built the {result.target} repository {result.out_dir} from {result.export_dir}")
    for model, v in result.versions.items():
        click.echo(f"  {model:<16} version {v}")


if __name__ == "__main__":
    repo_group()
