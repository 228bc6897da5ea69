"""`triton-hybrid report --since 1h --out report.png`: a chart of the weights and the traffic per
site over time (control/traffic/chart.py), from the decision audit or, with --prometheus, from Prometheus."""
from __future__ import annotations

import json
import time

import click

from control.cli import settings_from
from control.cli.output import json_option
from control.durations import parse_duration
from control.traffic import chart as report


@click.command("report")
@click.option("--since", default="1h", show_default=True, help="How far back: 30m, 1h, 2d ...")
@click.option("--out", "out", default="report.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.option("--prometheus", "prometheus_url", default=None, metavar="URL",
              help="Read Prometheus range queries instead of the audit database (e.g. http://127.0.0.1:9090).")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="Control database (default: the config's run_dir/control.database).")
@json_option
@click.pass_context
def report_cmd(ctx, since: str, out: str, prometheus_url: str | None, db_path: str | None, as_json: bool) -> None:
    """Chart site weights, per-site traffic and queue time over time into a PNG."""
    try:
        since_s = parse_duration(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    now = time.time()
    try:
        if prometheus_url:
            data = report.from_prometheus(prometheus_url, since_s, now=now)
        else:
            settings = settings_from(ctx)
            sites_of = {i.name: i.site for i in settings.instances}
            data = report.from_audit(db_path or settings.database_path, since_s, sites_of, now=now)
        summary = report.render(data, out)
    except report.ReportError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {summary['out']}: {summary['start']} – {summary['end']} from {summary['source']}")
    counted = (f"{summary['decisions']} decisions" if summary["decisions"] is not None
               else f"{summary['samples']} samples")
    click.echo(f"  {counted}, {summary['weight_changes']} weight changes; "
               f"final weights {summary['final_weights']}; mean req/s per site {summary['mean_rps']}")
    if summary["reasons"]:
        click.echo("  reasons: " + ", ".join(f"{r} x{n}" for r, n in summary["reasons"].items()))
