"""Route53: DNS between the site entries, through boto3.

One weighted record set per site entry under `record_name` (`SetIdentifier` = site, `Weight` = the
site weight 0..100, value = the entry: a CNAME to the site's load balancer, or an address), each
with a Route53 health check on that entry (`HealthCheckId`), so Route53 stops answering with a dead
entry. A site at weight 0 keeps its record and its check; nothing here deletes a record.

Health checks are ours when their `CallerReference` starts with `CALLER_PREFIX`; the reference is
derived from the zone, the record, the site and the check's settings, so a restart finds the one it
made (Route53 has no lookup by reference: we list). A changed setting is updated in place where
Route53 allows it (port, path, address of the same kind, failure threshold) and replaced otherwise
(type, interval); a replaced check of ours is deleted once no record points at it.

Tested against moto's server (`endpoint_url`), which stores health checks but does not run them;
production leaves `endpoint_url` empty (AWS).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from dataclasses import dataclass

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from control.traffic.actuators import ActuatorError, ApplyResult, Observed, Plan

log = logging.getLogger(__name__)

CALLER_PREFIX = "triton-hybrid-"
# Settings Route53's UpdateHealthCheck can change; Type and RequestInterval need a new check.
UPDATABLE = ("Port", "ResourcePath", "FullyQualifiedDomainName", "IPAddress", "FailureThreshold")


@dataclass(frozen=True)
class Record:
    """One site's weighted record as Route53 has it (or as we want it)."""

    site: str
    weight: int
    value: str
    ttl: int | None
    health_check_id: str | None

    def to_dict(self) -> dict:
        return {"site": self.site, "weight": self.weight, "value": self.value, "ttl": self.ttl,
                "health_check_id": self.health_check_id}


def health_check_spec(hc, target: str) -> dict:
    """Route53's HealthCheckConfig for one entry (pure): `hc` is a Route53HealthCheckConfig,
    `target` the site's record value (the address when `hc.address` is empty)."""
    address = (hc.address or target).rstrip(".")
    spec = {"Type": hc.type, "Port": hc.port, "ResourcePath": hc.path,
            "RequestInterval": hc.request_interval_s, "FailureThreshold": hc.failure_threshold}
    try:
        ipaddress.ip_address(address)
        spec["IPAddress"] = address
    except ValueError:
        spec["FullyQualifiedDomainName"] = address
    return spec


def caller_reference(zone_id: str, record_name: str, site: str, spec: dict) -> str:
    """Derived from what the check is for and its settings (<= 64 characters, Route53's limit)."""
    digest = hashlib.sha256(json.dumps([zone_id, record_name, site, spec], sort_keys=True).encode()).hexdigest()
    return f"{CALLER_PREFIX}{site[:16]}-{digest[:32]}"


def _same(have: dict, spec: dict) -> bool:
    keys = set(spec) | ({"IPAddress", "FullyQualifiedDomainName"} & set(have))
    return all((have.get(k) or None) == (spec.get(k) or None) for k in keys)


def _updatable(have: dict, spec: dict) -> bool:
    """Only updatable settings differ, and the address stays of the same kind (IP or name)."""
    fixed = [k for k in spec if k not in UPDATABLE]
    same_kind = bool(have.get("IPAddress")) == ("IPAddress" in spec)
    return same_kind and all(have.get(k) == spec[k] for k in fixed)


def _aws_error(e: Exception) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return str(e)


class Route53Weights:
    def __init__(self, client, rc, clock=time.monotonic):
        if not rc.hosted_zone_id:
            raise ActuatorError("control.route53.hosted_zone_id is empty: set the id of the hosted zone that "
                                "holds control.route53.record_name")
        self.client = client
        self.rc = rc
        self.zone_id = rc.hosted_zone_id
        self.record_name = rc.record_name if rc.record_name.endswith(".") else rc.record_name + "."
        self.record_type = rc.record_type
        self.ttl = rc.ttl
        self.targets = dict(rc.targets)
        self.clock = clock
        self.zone_checked = False
        self.checks: dict[str, str] = {}     # site -> health check id, as last verified
        self.checks_verified_at: float | None = None

    @classmethod
    def from_config(cls, rc, clock=time.monotonic) -> "Route53Weights":
        kw = {"region_name": rc.region, "config": BotoConfig(connect_timeout=rc.timeout_s, read_timeout=rc.timeout_s,
                                                             retries={"max_attempts": rc.max_attempts,
                                                                      "mode": "standard"})}
        if rc.endpoint_url:
            kw["endpoint_url"] = rc.endpoint_url
        if rc.access_key_id and rc.secret_access_key:
            kw["aws_access_key_id"] = rc.access_key_id.get_secret_value()
            kw["aws_secret_access_key"] = rc.secret_access_key.get_secret_value()
        return cls(boto3.client("route53", **kw), rc, clock)

    def _call(self, what: str, fn, **kw):
        try:
            return fn(**kw)
        except (ClientError, BotoCoreError) as e:
            code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None
            if code == "NoSuchHostedZone":
                raise ActuatorError(f"control.route53.hosted_zone_id {self.zone_id!r}: Route53 has no such hosted "
                                    f"zone ({what})") from None
            raise ActuatorError(f"Route53 {what} failed: {_aws_error(e)}") from None

    # ---- the zone --------------------------------------------------------------------------------
    def check_zone(self) -> None:
        """The zone exists and holds our record name (once; a wrong id or name is a config error)."""
        if self.zone_checked:
            return
        zone = self._call("GetHostedZone", self.client.get_hosted_zone, Id=self.zone_id)["HostedZone"]
        name = zone["Name"].lower()
        rn = self.record_name.lower()
        if rn != name and not rn.endswith("." + name):
            raise ActuatorError(f"control.route53.record_name {self.record_name!r} is not inside hosted zone "
                                f"{zone['Name']!r} (control.route53.hosted_zone_id {self.zone_id!r})")
        self.zone_checked = True

    # ---- records ---------------------------------------------------------------------------------
    def read_records(self) -> dict[str, Record]:
        """Our weighted records (our name and type, one per SetIdentifier)."""
        out: dict[str, Record] = {}
        kw = {"HostedZoneId": self.zone_id, "StartRecordName": self.record_name, "StartRecordType": self.record_type}
        while True:
            page = self._call("ListResourceRecordSets", self.client.list_resource_record_sets, **kw)
            for rr in page["ResourceRecordSets"]:
                if rr["Name"].lower() == self.record_name.lower() and rr["Type"] == self.record_type \
                        and "SetIdentifier" in rr:
                    values = [v["Value"] for v in rr.get("ResourceRecords", [])]
                    out[rr["SetIdentifier"]] = Record(rr["SetIdentifier"], int(rr.get("Weight", 0)),
                                                      values[0] if len(values) == 1 else ",".join(values),
                                                      rr.get("TTL"), rr.get("HealthCheckId"))
            if not page.get("IsTruncated") or page["NextRecordName"].lower() != self.record_name.lower():
                break
            kw = {"HostedZoneId": self.zone_id, "StartRecordName": page["NextRecordName"],
                  "StartRecordType": page["NextRecordType"]}
        return out

    def read(self) -> dict[str, int]:
        """Weights per site (SetIdentifier) of our record name/type."""
        return {site: r.weight for site, r in self.read_records().items()}

    def target(self, site: str) -> str:
        if site not in self.targets:
            raise ActuatorError(f"control.route53.targets has no target for site {site!r}: add the record value "
                                f"of that site's entry (its load balancer's name or address)")
        return self.targets[site]

    def want(self, site_weights: dict[str, int]) -> dict[str, Record]:
        """The records we want for these weights (health checks as last ensured)."""
        out = {}
        for site, weight in sorted(site_weights.items()):
            if not 0 <= int(weight) <= 255:
                raise ActuatorError(f"Route53 weight must be 0..255, got {weight} for {site}")
            out[site] = Record(site, int(weight), self.target(site), self.ttl, self.checks.get(site))
        return out

    def write_records(self, records: list[Record], comment: str = "triton-hybrid policy") -> str:
        changes = []
        for r in records:
            rrs = {"Name": self.record_name, "Type": self.record_type, "SetIdentifier": r.site, "Weight": r.weight,
                   "TTL": r.ttl, "ResourceRecords": [{"Value": r.value}]}
            if r.health_check_id:
                rrs["HealthCheckId"] = r.health_check_id
            changes.append({"Action": "UPSERT", "ResourceRecordSet": rrs})
        resp = self._call("ChangeResourceRecordSets", self.client.change_resource_record_sets,
                          HostedZoneId=self.zone_id, ChangeBatch={"Comment": comment, "Changes": changes})
        return resp["ChangeInfo"]["Id"]

    def write(self, site_weights: dict[str, int], comment: str = "triton-hybrid policy") -> str:
        return self.write_records(list(self.want(site_weights).values()), comment)

    # ---- health checks ---------------------------------------------------------------------------
    def _get_check(self, check_id: str) -> dict | None:
        try:
            return self.client.get_health_check(HealthCheckId=check_id)["HealthCheck"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchHealthCheck":
                return None
            raise ActuatorError(f"Route53 GetHealthCheck {check_id} failed: {_aws_error(e)}") from None
        except BotoCoreError as e:
            raise ActuatorError(f"Route53 GetHealthCheck {check_id} failed: {e}") from None

    def _find_by_reference(self, ref: str) -> dict | None:
        kw: dict = {}
        while True:
            page = self._call("ListHealthChecks", self.client.list_health_checks, **kw)
            for hc in page.get("HealthChecks", []):
                if hc.get("CallerReference") == ref:
                    return hc
            if not page.get("IsTruncated") or not page.get("NextMarker"):
                return None
            kw = {"Marker": page["NextMarker"]}

    def ensure_check(self, site: str, current_id: str | None) -> str:
        """The id of a health check on `site`'s entry with the configured settings: the one its
        record points at (updated in place if it is ours and only updatable settings differ), else
        the one we made earlier for these settings, else a new one."""
        field = f"control.route53.health_checks.{site}"
        spec = health_check_spec(self.rc.health_check(site), self.target(site))
        if current_id:
            hc = self._get_check(current_id)
            if hc is not None:
                have = hc["HealthCheckConfig"]
                if _same(have, spec):
                    return current_id
                if hc.get("CallerReference", "").startswith(CALLER_PREFIX) and _updatable(have, spec):
                    upd = {k: spec[k] for k in UPDATABLE if k in spec}
                    self._call(f"UpdateHealthCheck of {field} ({spec})", self.client.update_health_check,
                               HealthCheckId=current_id, HealthCheckVersion=int(hc.get("HealthCheckVersion", 1)),
                               **upd)
                    log.info("route53: updated health check %s of %s to %s", current_id, site, spec)
                    return current_id
        ref = caller_reference(self.zone_id, self.record_name, site, spec)
        found = self._find_by_reference(ref)
        if found is not None:
            return found["Id"]
        hc = self._call(f"CreateHealthCheck of {field} ({spec})", self.client.create_health_check,
                        CallerReference=ref, HealthCheckConfig=spec)["HealthCheck"]
        log.info("route53: created health check %s on %s's entry %s", hc["Id"], site, spec)
        return hc["Id"]

    def ensure_checks(self, sites, records: dict[str, Record], force: bool = False) -> list[str]:
        """Verify (or make) every site's health check when due: the first time, every
        `health_check_verify_s`, or when a record's check is not the one we hold. Returns the ids
        of our checks that this replaced (to delete once no record points at them)."""
        now = self.clock()
        due = force or self.checks_verified_at is None or \
            now - self.checks_verified_at >= self.rc.health_check_verify_s
        replaced = []
        for site in sorted(sites):
            current = records[site].health_check_id if site in records else self.checks.get(site)
            if not due and site in self.checks and current == self.checks[site]:
                continue
            # A record stripped of its check: the one we hold is still the candidate (its
            # reference may name older settings after an in-place update).
            new = self.ensure_check(site, current or self.checks.get(site))
            for old in {current, self.checks.get(site)} - {None, new}:
                replaced.append(old)
            self.checks[site] = new
        if due:
            self.checks_verified_at = now
        return replaced

    def delete_replaced(self, check_ids, records: dict[str, Record]) -> None:
        """Delete health checks we made that no record of ours points at any more."""
        in_use = {r.health_check_id for r in records.values()}
        for check_id in check_ids:
            if check_id in in_use:
                continue
            hc = self._get_check(check_id)
            if hc is None or not hc.get("CallerReference", "").startswith(CALLER_PREFIX):
                continue
            try:
                self.client.delete_health_check(HealthCheckId=check_id)
                log.info("route53: deleted replaced health check %s", check_id)
            except (ClientError, BotoCoreError) as e:
                # Leaves a stray check (billed, harmless to routing): say so, do not fail the apply.
                log.warning("route53: could not delete replaced health check %s: %s", check_id, _aws_error(e))


def _norm(r: Record | None, record_type: str) -> tuple | None:
    """Compare as Route53 does: names case-insensitive, a CNAME's value with or without the final dot."""
    if r is None:
        return None
    value = r.value.rstrip(".").lower() if record_type == "CNAME" else r.value
    return (r.weight, value, r.ttl, r.health_check_id)


class Route53Actuator:
    name = "route53"

    def __init__(self, records: Route53Weights):
        self.records = records

    @classmethod
    def from_settings(cls, settings) -> "Route53Actuator":
        return cls(Route53Weights.from_config(settings.control.route53))

    def set_instances(self, instances) -> None:
        """Records are per site, not per instance: a registry change needs nothing here."""

    def _observed(self, records: dict[str, Record]) -> Observed:
        sw = {"onprem": records["onprem"].weight if "onprem" in records else 0,
              "cloud": records["cloud"].weight if "cloud" in records else 0} if records else None
        rows = [{"record": self.records.record_name, **r.to_dict()} for _, r in sorted(records.items())]
        return Observed({}, set(), rows, sw)

    def observe(self) -> Observed:
        return self._observed(self.records.read_records())

    def apply(self, plan: Plan) -> ApplyResult:
        """Each site's record to its weight, target, TTL and health check; read back."""
        rt = self.records.record_type
        self.records.check_zone()
        want_weights = {k: int(v) for k, v in plan.site_weights.items()}
        for site in want_weights:
            self.records.target(site)   # a missing target fails before anything is written
        before = self.records.read_records()
        replaced = self.records.ensure_checks(want_weights, before)
        want = self.records.want(want_weights)
        todo = [r for site, r in want.items() if _norm(before.get(site), rt) != _norm(r, rt)]
        drift, cmds = [], []
        after = before
        if todo:
            drift = [f"route53 {r.site}: {before[r.site].to_dict() if r.site in before else 'missing'} -> "
                     f"{r.to_dict()}" for r in todo]
            change = self.records.write_records(todo)
            cmds.append(f"UPSERT {self.records.record_name} " + ", ".join(
                f"{r.site}={r.weight} (check {r.health_check_id})" for r in todo) + f" ({change})")
            after = self.records.read_records()
            left = [s for s, r in want.items() if _norm(after.get(s), rt) != _norm(r, rt)]
            if left:
                raise ActuatorError(f"Route53 still differs for {left} after the change: "
                                    f"{ {s: after[s].to_dict() if s in after else None for s in left} }")
        if replaced:
            self.records.delete_replaced(replaced, after)
        return ApplyResult(self._observed(after), cmds, drift)
