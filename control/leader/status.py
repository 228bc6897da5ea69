"""Who leads, for `triton-hybrid status`: this site's daemon says (GET /v1/leader); when it is down,
the lease in S3 still says who leads (the other site's control plane, if any)."""
from __future__ import annotations

import time

from control.adapters import s3 as s3x
from control.daemon.client import AdminClient, DaemonError
from control.leader.store import LeaseStore, lease_client


def leader_summary(settings) -> dict | None:
    """None with leader election off."""
    cfg = settings.control.leader
    if not cfg.enabled:
        return None
    try:
        return {"source": "daemon", **AdminClient(settings, timeout=3).call("GET", "/v1/leader")}
    except DaemonError as e:
        err = str(e)
    try:
        rec = LeaseStore(lease_client(settings.s3, cfg.s3_timeout_s), settings.s3).read().record
    except s3x.S3Error as e:
        return {"source": "none", "error": f"{err}; lease: {e}", "role": "down", "is_leader": False, "leader": None}
    valid = rec is not None and not rec.released and time.time() <= rec.expires_at + cfg.skew_margin_s
    return {"source": "s3 (daemon down)", "error": err, "role": "down", "is_leader": False,
            "name": cfg.name, "site": cfg.site, "leader": f"{rec.holder}@{rec.site}" if valid else None,
            "lease": rec.model_dump() if rec is not None else None}


def leader_line(summary: dict | None) -> str | None:
    """One line for the status table: who leads, since when, generation, and this daemon's role."""
    if not summary:
        return None
    lease = summary.get("lease") or {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease["acquired_at"])) if lease else "-"
    who = (f"{summary['leader']} since {since} (generation {lease.get('generation')})" if summary.get("leader")
           else "nobody leads")
    line = f"control plane leader: {who}; this one ({summary.get('name')}@{summary.get('site')}): {summary.get('role')}"
    return line + (f" [{summary['error']}]" if summary.get("error") else "")
