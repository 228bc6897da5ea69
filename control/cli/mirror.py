"""`triton-hybrid publish | sync | rollback | versions`: the model mirror (S3) and version rollout."""
from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table

from control.cli import settings_from
from control.cli.output import json_option
from control.mirror.manifest import ManifestError
from control.mirror.state import MirrorState

console = Console()


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _errors():
    from control.adapters.s3 import S3Error  # noqa: PLC0415
    from control.mirror.publish import PublishError  # noqa: PLC0415
    from control.mirror.sync import RollbackError, SyncError  # noqa: PLC0415
    return (PublishError, S3Error, ManifestError, RollbackError, SyncError)


@click.command("publish")
@click.argument("model", required=False)
@click.option("--version", "version", type=int, help="Version to publish (default: the newest local one).")
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False), help="Repository dir (default models.repository_dir).")
@click.option("--break-lock", is_flag=True, help="Take over the publish lock of a publisher that died.")
@json_option
@click.pass_context
def publish_cmd(ctx, model, version, repo_dir, break_lock, as_json):
    """Upload MODEL's version to S3 (manifest last, SSE, unchanged files skipped). Without MODEL:
    every model's newest version that S3 does not hold yet."""
    from control.mirror.publish import publish_repository, publish_version  # noqa: PLC0415

    settings = settings_from(ctx)
    repo = settings.path(repo_dir or settings.models.repository_dir)
    try:
        if model:
            results = [publish_version(settings, repo, model, version, progress=not as_json, break_lock=break_lock)]
        else:
            if version is not None:
                _fail("--version needs a MODEL")
            results = publish_repository(settings, repo, progress=not as_json)
    except _errors() as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=1))
        return
    t = Table("model", "version", "status", "files", "uploaded", "copied (server-side)", "unchanged", "seconds")
    for r in results:
        t.add_row(r.model, str(r.version), r.status, str(r.files), f"{r.uploaded_files} / {_mb(r.uploaded_bytes)}",
                  f"{r.copied_files} / {_mb(r.copied_bytes)}", f"{r.skipped_files} / {_mb(r.skipped_bytes)}",
                  f"{r.seconds:.2f}")
    console.print(t)
    for r in results:
        if r.retired:
            console.print(f"retention: removed {r.model} versions {r.retired} from S3")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n} B"


def _print_outcomes(results: dict) -> bool:
    ok = True
    t = Table("instance", "model", "version", "result", "previous", "seconds", "reason")
    for inst, outs in results.items():
        for d in outs.values():
            ok &= d["status"] != "failed"
            style = {"failed": "red", "live": "green", "skipped": "yellow"}.get(d["status"], "")
            t.add_row(inst, d["model"], str(d["version"] or "-"), f"[{style}]{d['status']}[/{style}]" if style else d["status"],
                      str(d["previous"] or "-"), f"{d['seconds']:.2f}", d["reason"] or "")
    console.print(t)
    return ok


@click.command("sync")
@click.option("--instance", help="Only this instance (default: every managed one).")
@click.option("--model", "models", multiple=True, help="Only these models (repeatable).")
@click.option("--retry-failed", is_flag=True, help="Forget earlier verify/load/smoke failures and try them again.")
@json_option
@click.pass_context
def sync_cmd(ctx, instance, models, retry_failed, as_json):
    """Pull, verify, smoke-test and roll the newest published versions onto the Triton instances."""
    from control.mirror.sync import sync_all  # noqa: PLC0415

    settings = settings_from(ctx)
    if instance:
        try:
            settings.instance(instance)
        except Exception as e:  # noqa: BLE001 - ConfigError names the known instances
            _fail(str(e))
    if retry_failed:
        st = MirrorState.for_settings(settings)
        for m in models or [None]:
            st.clear_failures(model=m, instance=instance)
        st.close()
    try:
        results = sync_all(settings, force=True, instance=instance, models=list(models) or None)
    except _errors() as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        _print_outcomes(results)
    # Failed versions, and instances not synced at all (S3 or Triton unreachable), exit non-zero.
    ok = all(o["status"] != "failed" and not (o["status"] == "skipped" and o["model"] == "*")
             for v in results.values() for o in v.values())
    if not ok:
        ctx.exit(1)


@click.command("rollback")
@click.argument("model")
@click.option("--to", "to", type=int, help="Version to bring back (default: the one before the live one).")
@json_option
@click.pass_context
def rollback_cmd(ctx, model, to, as_json):
    """Bring the previous (or named) version of MODEL back live on every instance."""
    from control.mirror.sync import rollback  # noqa: PLC0415

    settings = settings_from(ctx)
    try:
        res = rollback(settings, model, to)
    except _errors() as e:
        _fail(str(e))
    ok = all(o["status"] != "failed" and not (o["status"] == "skipped" and o["model"] == "*")
             for v in res["instances"].values() for o in v.values())
    if as_json:
        click.echo(json.dumps(res, indent=1))
    else:
        console.print(f"rollback of {model}: v{res['from']} -> v{res['to']}")
        ok = _print_outcomes(res["instances"]) and ok
    if not ok:
        ctx.exit(1)


@click.command("versions")
@click.option("--instance", help="Only this instance.")
@click.option("--model", help="Only this model.")
@json_option
@click.pass_context
def versions_cmd(ctx, instance, model, as_json):
    """Per instance and version: published, pulled, loaded, live, failed (with the reason); and
    each instance's lag behind the newest published version."""
    from control.mirror.sync import lag_report  # noqa: PLC0415

    settings = settings_from(ctx)
    st = MirrorState.for_settings(settings)
    try:
        published = st.published(model, present_only=False)
        rows = st.rows(instance, model)
        rejected = {(m, v): r for m in {p["model"] for p in published} for v, r in st.rejected(m).items()}
        lag = [r for r in lag_report(settings, st) if (not instance or r["instance"] == instance)
               and (not model or r["model"] == model)]
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps({"published": published, "instances": rows, "lag": lag,
                               "rejected": [{"model": m, "version": v, "reason": r} for (m, v), r in rejected.items()]},
                              indent=1))
        return
    t = Table("model", "version", "in S3", "files", "size", "published", "note", title="published")
    for p in published:
        note = rejected.get((p["model"], p["version"]), "")
        t.add_row(p["model"], str(p["version"]), "yes" if p["present"] else "retired", str(p["files"]),
                  _mb(p["bytes"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["published_at"])),
                  f"rejected: {note}" if note else "")
    console.print(t)
    t = Table("instance", "model", "version", "status", "updated", "reason", title="instances")
    for r in rows:
        style = {"live": "green", "failed": "red"}.get(r["status"], "")
        t.add_row(r["instance"], r["model"], str(r["version"]),
                  f"[{style}]{r['status']}[/{style}]" if style else r["status"],
                  time.strftime("%H:%M:%S", time.localtime(r["updated_at"])), r["reason"] or "")
    console.print(t)
    t = Table("instance", "model", "live", "newest", "lag (versions)", "lag (s)", "last sync error", title="lag")
    for r in lag:
        t.add_row(r["instance"], r["model"], str(r["live"] or "-"), str(r["newest"] or "-"), str(r["lag_versions"]),
                  f"{r['lag_s']:.0f}", r["last_sync_error"] or "")
    console.print(t)
