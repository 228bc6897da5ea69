"""`triton-hybrid publish | rollback | versions`: model versions in the S3 mirror. Publishing starts a
rollout (control/rollout/, `triton-hybrid rollout ...`); every host's agent does the rest."""
from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table

from control.cli import settings_from
from control.cli.output import json_option
from control.mirror.manifest import ManifestError

console = Console()


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


def _errors():
    from control.adapters.s3 import S3Error  # noqa: PLC0415
    from control.mirror.desired import DesiredStateError  # noqa: PLC0415
    from control.mirror.publish import PublishError  # noqa: PLC0415
    return (PublishError, S3Error, ManifestError, DesiredStateError)


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


@click.command("rollback")
@click.argument("model")
@click.option("--to", "to", type=int, help="Version to go back to (default: the one before the current one).")
@click.option("--by", default=None, help="Who asks (audit, rejection record); default cli:$USER.")
@json_option
@click.pass_context
def rollback_cmd(ctx, model, to, by, as_json):
    """Reject MODEL's current version (a running rollout's, else stable) and serve the previous one
    (or --to) on every instance: the rollout machine's rollback (= `rollout rollback`). The agents
    switch at their next pass; `triton-hybrid versions --model MODEL` shows them arrive."""
    from control.cli.rollout import run_command  # noqa: PLC0415 - boto3 is heavy

    run_command(ctx, model, "rollback", by, as_json, to=to)


@click.command("versions")
@click.option("--instance", help="Only this instance.")
@click.option("--model", help="Only this model.")
@json_option
@click.pass_context
def versions_cmd(ctx, instance, model, as_json):
    """Per model: the versions published in S3, the desired stable/canary version, rejected versions
    with their reasons, and what each instance's agent reports (target, live, state, error). All
    from the S3 mirror: true with or without the control plane."""
    # boto3 is heavy
    from control.adapters import s3 as s3x  # noqa: PLC0415
    from control.mirror.publish import list_models, published_versions, read_manifest  # noqa: PLC0415
    from control.rollout.controller import from_settings  # noqa: PLC0415

    settings = settings_from(ctx)
    client = s3x.make_client(settings.s3)
    ctl = from_settings(settings, client=client, audit=False)
    try:
        status = ctl.status(model)
        models = [model] if model else sorted(set(list_models(client, settings.s3)) | set(status["models"]))
        out = {}
        for m in models:
            info = status["models"].get(m) or ctl.status(m)["models"][m]
            published = []
            for v in published_versions(client, settings.s3, m):
                try:
                    man = read_manifest(client, settings.s3, m, v)
                except ManifestError as e:
                    published.append({"version": v, "error": str(e)})
                    continue
                if man is not None:
                    published.append({"version": v, "files": len(man.files), "bytes": man.total_bytes,
                                      "created": man.created, "content_sha256": man.content_sha256})
            insts = {n: i for n, i in info["instances"].items() if not instance or n == instance}
            out[m] = {"published": published, "stable": info["stable"], "canary": info["canary"],
                      "phase": info["phase"], "rejected": info["rejected"], "instances": insts}
    except _errors() as e:
        _fail(str(e))
    finally:
        ctl.close()
    if as_json:
        click.echo(json.dumps({"models": out, "problems": status["problems"]}, indent=1, default=str))
        return
    for m, info in out.items():
        canary = f", canary v{info['canary']['version']}" if info["canary"] else ""
        t = Table("version", "files", "size", "published", "note",
                  title=f"{m}: stable v{info['stable']}{canary} ({info['phase']})", title_justify="left")
        for p in info["published"]:
            v = p["version"]
            rej = info["rejected"].get(v)
            note = (f"rejected: {rej['reason']}" if rej else "stable" if v == info["stable"]
                    else "canary" if info["canary"] and v == info["canary"]["version"] else "")
            if "error" in p:
                t.add_row(str(v), "-", "-", "-", f"[red]{p['error']}[/red]")
            else:
                t.add_row(str(v), str(p["files"]), _mb(p["bytes"]),
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["created"])), note)
        console.print(t)
        t = Table("instance", "site", "target", "live", "state", "age s", "error", box=None)
        for n, i in info["instances"].items():
            style = {"live": "green", "failed": "red"}.get(str(i.get("state")), "")
            state = str(i.get("state", "-"))
            t.add_row(n, i["site"], str(i.get("target", "-")), str(i.get("live", "-")),
                      f"[{style}]{state}[/{style}]" if style else state, str(i["age_s"]), str(i.get("error") or ""))
        console.print(t)
    for p in status["problems"]:
        console.print(f"[yellow]warning:[/yellow] {p}")
