"""Route53 weighted records (DNS-level hybrid routing) through boto3.

One record set per site under `record_name`, `SetIdentifier` = site, `Weight` = the site weight,
value = the site's target (a CNAME to the site's load balancer, or an address). Route53 weights are
0..255 relative; we write the site weights (0..100). Tested against moto's server
(`endpoint_url`); production leaves `endpoint_url` empty.
"""
from __future__ import annotations

import boto3

from control.traffic.actuators import ActuatorError, ApplyResult, Observed, Plan


class Route53Weights:
    def __init__(self, client, zone_id: str, record_name: str, record_type: str, ttl: int, targets: dict[str, str]):
        self.client = client
        self.zone_id = zone_id
        self.record_name = record_name if record_name.endswith(".") else record_name + "."
        self.record_type = record_type
        self.ttl = ttl
        self.targets = dict(targets)

    @classmethod
    def from_config(cls, rc) -> "Route53Weights":
        kw = {"region_name": rc.region}
        if rc.endpoint_url:
            kw["endpoint_url"] = rc.endpoint_url
        if rc.access_key_id and rc.secret_access_key:
            kw["aws_access_key_id"] = rc.access_key_id.get_secret_value()
            kw["aws_secret_access_key"] = rc.secret_access_key.get_secret_value()
        client = boto3.client("route53", **kw)
        if not rc.hosted_zone_id:
            raise ActuatorError("control.route53.hosted_zone_id is empty")
        return cls(client, rc.hosted_zone_id, rc.record_name, rc.record_type, rc.ttl, rc.targets)

    def read(self) -> dict[str, int]:
        """Weights per site (SetIdentifier) of our record name/type."""
        out: dict[str, int] = {}
        kw = {"HostedZoneId": self.zone_id, "StartRecordName": self.record_name, "StartRecordType": self.record_type}
        while True:
            page = self.client.list_resource_record_sets(**kw)
            for rr in page["ResourceRecordSets"]:
                if rr["Name"] == self.record_name and rr["Type"] == self.record_type and "SetIdentifier" in rr:
                    out[rr["SetIdentifier"]] = int(rr.get("Weight", 0))
            if not page.get("IsTruncated"):
                break
            kw = {"HostedZoneId": self.zone_id, "StartRecordName": page["NextRecordName"],
                  "StartRecordType": page["NextRecordType"]}
            if page["NextRecordName"] != self.record_name:
                break
        return out

    def write(self, site_weights: dict[str, int], comment: str = "triton-hybrid policy") -> str:
        changes = []
        for site, weight in sorted(site_weights.items()):
            if site not in self.targets:
                raise ActuatorError(f"control.route53.targets has no target for site {site!r}")
            if not 0 <= int(weight) <= 255:
                raise ActuatorError(f"Route53 weight must be 0..255, got {weight} for {site}")
            changes.append({"Action": "UPSERT", "ResourceRecordSet": {
                "Name": self.record_name, "Type": self.record_type, "SetIdentifier": site,
                "Weight": int(weight), "TTL": self.ttl, "ResourceRecords": [{"Value": self.targets[site]}]}})
        resp = self.client.change_resource_record_sets(
            HostedZoneId=self.zone_id, ChangeBatch={"Comment": comment, "Changes": changes})
        return resp["ChangeInfo"]["Id"]


class Route53Actuator:
    name = "route53"

    def __init__(self, records: Route53Weights):
        self.records = records

    @classmethod
    def from_settings(cls, settings) -> "Route53Actuator":
        return cls(Route53Weights.from_config(settings.control.route53))

    def set_instances(self, instances) -> None:
        """Records are per site, not per instance: a registry change needs nothing here."""

    def observe(self) -> Observed:
        try:
            w = self.records.read()
        except Exception as e:  # noqa: BLE001 - botocore errors are many
            raise ActuatorError(f"Route53 read failed: {e}") from None
        sw = {"onprem": w.get("onprem", 0), "cloud": w.get("cloud", 0)} if w else None
        return Observed({}, set(), [{"record": self.records.record_name, "site": k, "weight": v} for k, v in w.items()], sw)

    def apply(self, plan: Plan) -> ApplyResult:
        before = self.observe()
        want = {k: int(v) for k, v in plan.site_weights.items()}
        drift, cmds = [], []
        if before.site_weights != want:
            drift = [f"route53 {before.site_weights} -> {want}"]
            try:
                change = self.records.write(want)
            except ActuatorError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ActuatorError(f"Route53 change failed: {e}") from None
            cmds.append(f"UPSERT {self.records.record_name} {want} ({change})")
        after = self.observe()
        if after.site_weights != want:
            raise ActuatorError(f"Route53 still shows {after.site_weights} after setting {want}")
        return ApplyResult(after, cmds, drift)
