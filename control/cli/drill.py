"""`triton-hybrid drill SCENARIO|all`: break one part of a drill stack under load and measure.

Each drill starts a stack of its own (its own run dir and free ports, so a running `up` stack is
never touched): the configured instances' Tritons on the model repository, HAProxy with the drill
tuning, the control daemon where the scenario needs it. Reports go to
`reports/drills/<timestamp>-<scenario>/` (report.md, report.json, timeline.png).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from control.cli import settings_from
from control.cli.output import json_option
from control.drills import rolling, scenarios, sites
from control.drills.load import RequestSpec, auto_spec
from control.drills.runner import (
    MODEL_ADD_ONE,
    add_one_spec,
    default_reports_dir,
    run_drill,
    write_add_one_repository,
)
from model_repository.smoke import smoke_request, to_infer_inputs
from model_repository.spec import ENSEMBLE

console = Console()


def search_ranking_spec(repository: Path):
    """The stored smoke request of the ensemble (model_repository/smoke.py), for the drill load."""
    inputs, _ = smoke_request(repository)
    return RequestSpec(ENSEMBLE, lambda m: to_infer_inputs(inputs, m))


def _spec_factory(model: str, repository: Path):

    def factory(env):
        if model == MODEL_ADD_ONE:
            return add_one_spec()
        if model == "search_ranking":
            try:
                return search_ranking_spec(repository)
            except (ImportError, FileNotFoundError, KeyError, ValueError):
                pass
        inst = env.settings.instances[0]
        http_port = env.listen_ports.get(inst.name, (inst.http_port,))[0]
        return auto_spec(f"http://{inst.host}:{http_port}", model)
    return factory


@click.command("drill")
@click.argument("scenario")
@click.option("--duration", type=click.FloatRange(5, 600), default=30.0, show_default=True,
              help="Seconds of client load; the fault comes at 30% and is lifted at 60% of it.")
@click.option("--rate", type=click.FloatRange(1, 500), default=50.0, show_default=True,
              help="Requests per second (open loop, HTTP and gRPC alternating).")
@click.option("--model", default="search_ranking", show_default=True,
              help="Model the load calls (add_one: a built-in test model, no repository needed). "
                   "The S3 scenarios always publish versions of add_one.")
@click.option("--repository", type=click.Path(file_okay=False), default=None,
              help="Model repository to serve (default: models.repository_dir of the config).")
@click.option("--weights", default=None, metavar="ONPREM/CLOUD",
              help="Site weights of the drill stack's haproxy.cfg, e.g. 90/10 (default: the config's).")
@click.option("--control/--no-control", "with_control", default=None,
              help="Run the control daemon in the drill stack (default: where the scenario needs it).")
@click.option("--restart-mode", type=click.Choice(["graceful", "kill"]), default="graceful", show_default=True,
              help="haproxy-restart: soft stop (SIGUSR1) or kill -9 of the old proxy.")
@click.option("--guard/--no-guard", default=True, show_default=True,
              help="query-of-death: the proxy's request guard on, or off to see what it prevents.")
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False), default=None,
              help="Reports folder (default reports/drills).")
@json_option
@click.pass_context
def drill_cmd(ctx, scenario, duration, rate, model, repository, weights, with_control, restart_mode, guard,
              reports_dir, as_json):
    """Run a disaster-recovery drill: SCENARIO is one of the list below, or `all`.

    onprem-crash, onprem-hang, onprem-partition, cloud-latency, s3-outage, bad-model,
    corrupt-artifact, control-crash, haproxy-restart, query-of-death; entry-rolling-update (a
    site entry's HAProxy replicas rolled as its Kubernetes Deployment would be, under --rate load;
    needs root: control/drills/rolling.py); and the two-site drills (their own stack: each site and
    each control plane in network namespaces, needs root; not in `all`): site-down, control-partition."""
    settings = settings_from(ctx)
    if scenario == rolling.NAME:
        _entry_rolling_update(ctx, settings, rate, reports_dir, as_json)
        return
    if scenario in sites.DRILLS:
        _two_site_drill(ctx, settings, scenario, rate, reports_dir, as_json)
        return
    names = list(scenarios.SCENARIOS) if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown scenario {unknown[0]!r}; known: {', '.join(scenarios.SCENARIOS)}, all, "
                                 f"{rolling.NAME}, {', '.join(sites.DRILLS)}",
                                 param_hint="SCENARIO")
    if len(settings.site_instances("onprem")) < 1 or len(settings.site_instances("cloud")) < 1:
        raise click.ClickException("a drill needs at least one onprem and one cloud instance in the config")
    if model == MODEL_ADD_ONE:
        repo = write_add_one_repository(settings.run_path / "drills" / "add_one-repository")
    else:
        repo = Path(repository) if repository else settings.path(settings.models.repository_dir)
        if not (repo / model).is_dir():
            raise click.ClickException(f"{repo} has no model {model!r}; build the repository first "
                                       "(`make demo` or `triton-hybrid repo build`) or run with --model add_one")
    if model not in settings.haproxy.served_models:
        # The drill stack's proxy must let the load's model through its allowlist.
        settings = settings.model_copy(update={"haproxy": settings.haproxy.model_copy(
            update={"served_models": [*settings.haproxy.served_models, model]})})
    weight_map = None
    if weights:
        try:
            on, cl = (int(x) for x in weights.split("/"))
        except ValueError:
            raise click.BadParameter("use ONPREM/CLOUD, e.g. 90/10", param_hint="--weights") from None
        weight_map = {i.name: (on if i.site == "onprem" else cl) for i in settings.instances}
    reports = Path(reports_dir) if reports_dir else None
    results = []
    for name in names:
        console.rule(f"drill {name}")
        try:
            rep = run_drill(scenarios.get(name), settings, repo, duration_s=duration, rate=rate,
                            spec_factory=_spec_factory(model, repo), reports_dir=reports,
                            say=lambda m: console.print(f"[dim]{m}[/dim]"), weights=weight_map,
                            with_control=with_control, restart_mode=restart_mode, guard=guard)
        except Exception as e:  # noqa: BLE001 - one broken drill must not stop `all`
            console.print(f"[red]{name}: the drill itself failed:[/red] {e}")
            rep = {"scenario": name, "status": "error", "error": str(e), "passed": False}
        results.append(rep)
        _print_one(rep)
    if len(results) > 1:
        _aggregate(results, reports)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "series"} for r in results], indent=2, default=str))
    if any(r.get("status") in ("failed", "error") for r in results):
        ctx.exit(1)


def _entry_rolling_update(ctx, settings, rate: float, reports_dir, as_json: bool) -> None:
    ok, why = rolling.available()
    if not ok:
        raise click.ClickException(why)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(reports_dir or default_reports_dir()) / f"{stamp}-{rolling.NAME}"
    rep = rolling.run_rolling_update(settings.run_path / "drills" / f"{stamp}-{rolling.NAME}", rate=rate,
                                     say=lambda m: console.print(f"[dim]{m}[/dim]"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    color = "green" if rep["failed"] == 0 else "red"
    console.print(f"[{color}]{rolling.NAME}: {rep['requests']} requests, {rep['failed']} failed[/{color}] "
                  f"(rollout {rep['rollout_s']}s at {rep['rate']:g}/s)")
    for name, v in rep["served_by_replica"].items():
        console.print(f"  {name} (generation {v['generation']}): {v['served']} requests")
    console.print(f"  report: {out}/report.json")
    if rep["failed"]:
        ctx.exit(1)


def _two_site_drill(ctx, settings, name: str, rate: float, reports_dir, as_json: bool) -> None:
    ok, why = sites.available()
    if not ok:
        raise click.ClickException(f"drill {name} puts each site and each control plane in a network namespace of "
                                   f"its own: {why}. Run it as root on a machine with iproute2 and util-linux.")
    # --rate applies to each entry here; its default (made for one stack) gives way to the drill's own.
    explicit = ctx.get_parameter_source("rate") is not click.core.ParameterSource.DEFAULT
    cfg = sites.SiteDrillConfig(**({"rate": min(rate, 200.0)} if explicit else {}))
    reports = Path(reports_dir) if reports_dir else default_reports_dir(settings)
    console.rule(f"drill {name}")
    rep = sites.run_site_drill(name, settings.run_path / "drills" / "sites", cfg, reports_dir=reports,
                               say=lambda m: console.print(f"[dim]{m}[/dim]"))
    _print_one(rep)
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
    if rep.get("status") != "passed":
        ctx.exit(1)


def _print_one(rep: dict) -> None:
    status = rep.get("status")
    color = {"passed": "green", "failed": "red", "skipped": "yellow", "error": "red"}.get(status, "white")
    console.print(f"[{color}]{rep['scenario']}: {status}[/{color}]"
                  + (f" ({rep.get('skip_reason') or rep.get('error')})" if status in ("skipped", "error") else ""))
    for t in rep.get("targets", []):
        mark = "[green]pass[/green]" if t["ok"] else "[red]FAIL[/red]"
        console.print(f"  {mark} {t['name']}: {t['value']} (goal {t['goal']})")
    if rep.get("report_dir"):
        console.print(f"  report: {rep['report_dir']}/report.md")


def _aggregate(results: list[dict], reports_dir: Path | None) -> None:

    table = Table(title="drills")
    for col in ("scenario", "status", "detect s", "recovery s", "after lift s", "restored s", "failed", "report"):
        table.add_column(col)
    rows = []
    for r in results:
        f = r.get("figures", {})
        row = {"scenario": r["scenario"], "status": r.get("status"), "detect_s": f.get("detect_s"),
               "recovery_s": f.get("recovery_s"), "after_lift_s": (f.get("after_lift") or {}).get("serving_s"),
               "restored_s": (f.get("restore") or {}).get("restored_s"),
               "failed": (f.get("failures") or {}).get("total"), "report_dir": r.get("report_dir"),
               "reason": r.get("skip_reason") or r.get("error")}
        rows.append(row)
        table.add_row(*(str(row[k]) if row[k] is not None else "-" for k in
                        ("scenario", "status", "detect_s", "recovery_s", "after_lift_s", "restored_s", "failed",
                         "report_dir")))
    console.print(table)
    out = Path(reports_dir or default_reports_dir()) / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-all"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    lines = ["# Drills: summary", "",
             "| scenario | status | detect s | recovery s | after lift s | restored s | failed | report |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[k] is None else str(row[k]) for k in
                                       ("scenario", "status", "detect_s", "recovery_s", "after_lift_s",
                                        "restored_s", "failed", "report_dir")) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    console.print(f"summary: {out}/summary.md")
