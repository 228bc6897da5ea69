"""`triton-hybrid repo ...`: build the Triton model repository from an export."""
from __future__ import annotations

from pathlib import Path

import click

from model_repository.spec import TARGETS, VARIANTS, Limits


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
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="fp32", show_default=True,
              help="The graphs served: fp32, int8 (both graphs quantized) or student (distilled encoder + its own ranker); "
                   "the export must hold the variant's files.")
@click.option("--max-candidates", type=click.IntRange(min=1), default=Limits.max_candidates, show_default=True,
              help="Requests with more candidate ids per query are refused.")
@click.option("--max-top-k", type=click.IntRange(min=1), default=Limits.max_top_k, show_default=True,
              help="Requests asking for a larger top_k are refused.")
@click.option("--max-query-bytes", type=click.IntRange(min=1), default=Limits.max_query_bytes, show_default=True,
              help="Longer queries (UTF-8 bytes) are refused.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=10, show_default=True,
              help="top_k when the request gives none.")
@click.option("--strict-unknown-ids/--lenient-unknown-ids", default=False, show_default=True,
              help="strict: a candidate id missing from the feature table fails the request; lenient: it is "
                   "ranked with cold-start features and counted in UNKNOWN_COUNT.")
def build_cmd(target: str, export_dir: Path | None, out_dir: Path | None, version: int | None,
              dynamic_batching: bool, variant: str, max_candidates: int, max_top_k: int, max_query_bytes: int,
              top_k: int, strict_unknown_ids: bool) -> None:
    """Assemble the repository from an export: configs, Python-backend code, weights and data."""
    from model_repository.build import (  # noqa: PLC0415
        BuildError,
        build_repository,
        default_out_dir,
        latest_export_dir,
        spec_for_export,
    )  # noqa: PLC0415 - deferred: pulls in tritonclient, grpc

    try:
        export_dir = export_dir or latest_export_dir()
        spec = spec_for_export(export_dir, max_candidates=max_candidates, max_query_bytes=max_query_bytes,
                               max_top_k=max_top_k, top_k_default=top_k, strict_unknown_ids=strict_unknown_ids,
                               variants={target: variant})
        result = build_repository(export_dir, out_dir or default_out_dir(target), target=target, version=version,
                                  spec=spec, dynamic_batching=dynamic_batching)
    except (BuildError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"built the {result.target} repository {result.out_dir} from {result.export_dir} "
               f"(variant {result.variant})")
    for model, v in result.versions.items():
        click.echo(f"  {model:<16} version {v}")


if __name__ == "__main__":
    repo_group()
