"""Two sites on one machine, and the two acceptance drills of issue 16 (docs/drills.md "Two sites").

Layout (real processes; only loopback and the namespaces made here carry traffic):

    root namespace:  moto's server (S3 + Route53) on the bridge address, the clients (load, probes),
                     the bridge thd<tag>br (10.214.N.1/24)
    thd<tag>on      the on-prem site: its HAProxy entry + entry agent, its Triton host + host agent
    thd<tag>cl      the cloud site: the same
    thd<tag>con     the on-prem control plane (`triton-hybrid control run`, leader election on,
                    actuators [entries, route53])
    thd<tag>ccl     the cloud control plane

Every namespace hangs on one bridge by a veth pair, so the namespaces reach each other and S3 at L2,
without IP forwarding (a host setting we leave alone). A fault is a link down of the namespace end
of a veth (packets dropped, not refused: a real site loss or partition), so a site can come back.
The control planes have namespaces of their own so that one can lose S3 while its site serves on.

Drills (`triton-hybrid drill site-down|control-partition`, `run_site_drill`):

- `site-down`: under load through both entries, both on-prem namespaces go down at once (links
  down, not SIGKILL: the site can then return, and its old leader, alive but partitioned, must come
  back as standby: the harder case). Figures: failed requests at the cloud entry, time until the
  cloud control plane leads, until Route53 points at the cloud entry only, sensitive requests at the
  cloud entry (503 with the reason, none served by the cloud Triton: its counter of the sensitive
  model), then after the return: rejoined as standby, failback moves, no flapping, never two leaders.
- `control-partition`: the leading control plane's link goes down while the sites serve: it stops
  acting by its own deadline, the other leads, and no write of the old generation to desired.json or
  traffic.json lands after the new leader's first (bucket versioning: every write is read back).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from control.adapters import haproxy_config
from control.adapters import s3 as s3x
from control.config import DEFAULT_CONFIG, Settings, deep_merge, load_config, plain_dump
from control.daemon.client import AdminClient
from control.drills import hosts, netns
from control.drills.hosts import Host
from control.drills.load import OpenLoopLoad, RequestSpec
from control.drills.models import ADD_ONE, write_add_model
from control.drills.netns import NetnsError
from control.drills.runner import add_one_spec
from control.drills.scenarios import target
from control.local.haproxy import write_config
from control.local.isolated import isolated_settings
from control.local.procs import ManagedProcess, free_port, http_ok, start_ready
from control.local.s3_endpoint import start_s3_server
from control.mirror.desired import DesiredState, DesiredStore, control_key, seed_stable
from control.mirror.publish import publish_repository
from control.traffic.entries import TrafficState
from control.waiting import wait_until

SITES = ("onprem", "cloud")
SENSITIVE_MODEL = "add_sensitive"
ENTRY_TOKEN_BYTES = 24
ZONE = "sites.triton-hybrid.test."
RECORD = f"search.{ZONE}"


class SiteDrillError(RuntimeError):
    """The two-site harness could not be made or a drill step timed out; the message says which."""


class SiteDrillConfig(BaseModel):
    """Knobs of the two-site drills (defaults: the figures in docs/drills.md were measured with them)."""

    rate: float = Field(20.0, gt=0, le=200)              # requests/s through EACH entry
    sensitive_rate: float = Field(5.0, gt=0, le=50)      # sensitive probes/s at the cloud entry
    before_s: float = Field(4.0, ge=1)                   # load before the fault
    outage_s: float = Field(5.0, ge=1)                   # site-down: outage kept this long after DNS moved
    settle_s: float = Field(8.0, ge=1)                   # after failback: watched for flapping
    landing_s: float = Field(6.0, ge=1)                  # partition: old requests may still land this long after the heal
    lease_s: float = 5.0
    renew_s: float = 1.0
    skew_margin_s: float = 1.0
    takeover_target_s: float = 10.0
    failback_healthy_s: float = Field(4.0, gt=0)         # policy: a failed site stays healthy this long
    entry_interval_s: float = Field(0.2, gt=0)
    entry_report_stale_s: float = Field(3.0, gt=0)
    step_timeout_s: float = Field(60.0, gt=0)            # any single wait of the drill


# Network: one bridge, a veth per namespace --------------------------------------------------------

@dataclass
class BridgedNs:
    """A namespace on the sites' bridge: what Host needs of a SiteNetns (ns, root_ip, ns_ip, exec_prefix,
    destroy, link_down/up); root_ip is the bridge's address (where the host's S3 forwarder listens)."""

    bridge: netns.Bridge
    ns: str
    ns_ip: str
    veth_root: str = field(init=False)
    veth_ns: str = field(init=False)
    root_ip: str = field(init=False)
    created: bool = False

    def __post_init__(self) -> None:
        self.veth_root, self.veth_ns, self.root_ip = f"{self.ns}r", f"{self.ns}n", self.bridge.ip

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def create(self) -> "BridgedNs":
        netns.run(["ip", "netns", "add", self.ns])
        self.created = True
        self.bridge.attach(self.ns, self.veth_root, self.veth_ns, self.ns_ip)
        return self

    def link_down(self) -> None:
        netns.run(["ip", "-n", self.ns, "link", "set", self.veth_ns, "down"])

    def link_up(self) -> None:
        netns.run(["ip", "-n", self.ns, "link", "set", self.veth_ns, "up"])

    def destroy(self) -> None:
        netns.run(["ip", "link", "del", self.veth_root], check=False)
        if self.created:
            netns.run(["ip", "netns", "del", self.ns], check=False)
            self.created = False


def available() -> tuple[bool, str]:
    """(True, "") when the two sites can be made here: root, iproute2, util-linux (hosts.available)."""
    return hosts.available()


# Audits -----------------------------------------------------------------------------------------------

def transitions(settings: Settings) -> list[dict]:
    with sqlite3.connect(settings.database_path, timeout=5) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM leader_transitions ORDER BY id")]


def applied_times(settings: Settings) -> list[float]:
    with sqlite3.connect(settings.database_path, timeout=5) as db:
        return [r[0] for r in db.execute("SELECT ts FROM control_decisions WHERE applied = 1 ORDER BY id")]


def leading_intervals(rows: list[dict], now: float, ends: list[float] = ()) -> list[tuple[float, float]]:
    """Leading intervals from one daemon's leader_transitions (a pure function). An interval still
    open when its process was killed ends at the next of `ends` (kill times) after its start; one
    still open otherwise ends now; a `following` row without a kill closes it."""
    out, start = [], None
    for r in rows:
        if r["event"] in ("acquired", "recovered") and start is None:
            start = r["ts"]
        elif r["event"] in ("stepped_down", "released") and start is not None:
            out.append((start, r["ts"]))
            start = None
        elif r["event"] == "following" and start is not None:  # a restarted process: the old life ended
            out.append((start, min([e for e in ends if e >= start], default=r["ts"])))
            start = None
    if start is not None:
        out.append((start, min([e for e in ends if e >= start], default=now)))
    return out


def overlaps(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[tuple, tuple]]:
    return [(x, y) for x in a for y in b if not (x[1] <= y[0] or y[1] <= x[0])]


def outside(times: list[float], spans: list[tuple[float, float]]) -> list[float]:
    return [t for t in times if not any(s <= t <= e for s, e in spans)]


def onprem_moves(weights: list[int]) -> tuple[int, int]:
    """(moves up, direction changes) of a sequence of on-prem site weights (a pure function)."""
    ups = sum(1 for a, b in zip(weights, weights[1:]) if b > a)
    deltas = [b - a for a, b in zip(weights, weights[1:]) if b != a]
    turns = sum(1 for x, y in zip(deltas, deltas[1:]) if (x > 0) != (y > 0))
    return ups, turns


# The lab ------------------------------------------------------------------------------------------------

class TwoSites:
    """Moto (S3 + Route53) in the root namespace; per site a namespace with its Triton host + agent and
    its HAProxy entry + entry agent, and a namespace with its control plane."""

    def __init__(self, run_dir: Path, cfg: SiteDrillConfig | None = None, say=print):
        self.run_dir, self.cfg, self.say = Path(run_dir), cfg or SiteDrillConfig(), say
        self.tag = f"{os.getpid() % 1000:03d}{random.randrange(16):x}"
        self.bridge: netns.Bridge | None = None
        self.spaces: dict[str, BridgedNs] = {}
        self.settings: Settings | None = None
        self.entries: dict[str, Settings] = {}
        self.ctl: dict[str, Settings] = {}
        self.hosts: dict[str, Host] = {}
        self.procs: dict[str, ManagedProcess] = {}
        self.token = os.urandom(ENTRY_TOKEN_BYTES).hex()
        self.client = None
        self.route53 = None
        self.zone_id = ""
        self.timings: dict[str, float] = {}

    # ---- start -----------------------------------------------------------------------------------
    def start(self) -> "TwoSites":
        ok, why = available()
        if not ok:
            raise SiteDrillError(f"the two-site drills need network namespaces: {why} (run as root with iproute2 "
                                 "and util-linux)")
        t0 = time.monotonic()
        try:
            self._network()
            self._settings()
            self._s3()
            for site in SITES:
                self._host(site)
            for site in SITES:
                self._entry(site)
            self._zone()
            self._control("onprem")
            wait_until(lambda: self.leader_view("onprem")["is_leader"], self.cfg.step_timeout_s, "ctl-onprem to lead")
            self._control("cloud")
            wait_until(lambda: self.follows("cloud", "ctl-onprem@onprem"), self.cfg.step_timeout_s,
                       "ctl-cloud to follow ctl-onprem")
            wait_until(self._calm, self.cfg.step_timeout_s,
                       "both entries at the leader's weights and both Route53 records written", interval=0.25)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = round(time.monotonic() - t0, 2)
        return self

    def _network(self) -> None:
        subnet = netns.free_subnet("10.214")
        self.bridge = netns.Bridge(f"{netns.PREFIX}{self.tag}br", f"10.214.{subnet}.1").create()
        for key, suffix, no in (("onprem", "on", 2), ("cloud", "cl", 3), ("ctl-onprem", "con", 4),
                                ("ctl-cloud", "ccl", 5)):
            self.spaces[key] = BridgedNs(self.bridge, f"{netns.PREFIX}{self.tag}{suffix}",
                                         f"10.214.{subnet}.{no}").create()

    def _settings(self) -> None:
        c = self.cfg
        base = yaml.safe_load(DEFAULT_CONFIG.read_text())
        base["instances"] = [
            {"name": "onprem-1", "site": "onprem", "weight": 99, "sensitive_ok": True,
             "host": self.spaces["onprem"].ns_ip},
            {"name": "cloud-1", "site": "cloud", "weight": 1, "sensitive_ok": False,
             "host": self.spaces["cloud"].ns_ip}]
        self.settings = isolated_settings(
            self.run_dir / "lab", instances=None, base=base,
            s3={"host": self.bridge.ip, "start_local_server": True},
            haproxy={"served_models": [ADD_ONE, SENSITIVE_MODEL], "health_interval_ms": 200,
                     "timeout_connect_ms": 300, "timeout_server_ms": 800},
            agent={"interval_s": 0.5},
            entry={"report_stale_s": c.entry_report_stale_s},
            control={"policy": {"failback_healthy_s": c.failback_healthy_s, "util_signal": "none"}})

    def _derive(self, name: str, updates: dict) -> Settings:
        """The lab's settings with `updates` deep-merged, its own run dir, as a mode-600 file."""
        data = plain_dump(self.settings)
        data.pop("source", None)
        data = deep_merge(data, {"run_dir": str(self.run_dir / name), **updates})
        path = self.run_dir / f"config-{name}.yaml"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(data))
        s = load_config(path, environ={})
        s.run_path.mkdir(parents=True, exist_ok=True)
        return s

    def _s3(self) -> None:
        s = self.settings
        s.run_path.mkdir(parents=True, exist_ok=True)
        self.procs["s3"] = start_s3_server(s)
        self.client = s3x.make_client(s.s3)
        s3x.ensure_bucket(self.client, s.s3)
        self.client.put_bucket_versioning(Bucket=s.s3.bucket, VersioningConfiguration={"Status": "Enabled"})
        repo = self.run_dir / "repository"
        write_add_model(repo, 1, 1.0)
        write_add_model(repo, 1, 1.0, name=SENSITIVE_MODEL)
        published = publish_repository(s, repo, progress=False, client=self.client)
        DesiredStore(self.client, s.s3).update(seed_stable({r.model: r.version for r in published}), by="site drill")

    def _host(self, site: str) -> None:
        name = f"{site}-1"
        h = self.hosts[site] = Host(self.settings, name, self.spaces[site], self.settings.run_path / "hosts" / name)
        h.start()
        for model in (ADD_ONE, SENSITIVE_MODEL):
            wait_until(lambda m=model: http_ok(f"{h.inst.http_url}/v2/models/{m}/ready"), self.cfg.step_timeout_s,
                       f"{name}: {model} ready (pulled and loaded by its agent)")

    def _entry(self, site: str) -> None:
        ip = self.spaces[site].ns_ip
        s = self.entries[site] = self._derive(f"entry-{site}", {
            "haproxy": {"host": ip, "http_port": free_port(), "grpc_port": free_port(), "stats_port": free_port()},
            "entry": {"site": site, "name": "lb-1", "interval_s": self.cfg.entry_interval_s, "api_host": ip,
                      "api_port": free_port(), "token": self.token}})
        pre, h = self.spaces[site].exec_prefix(), s.haproxy
        binary = write_config(s, site)
        self.procs[f"haproxy-{site}"] = start_ready(
            f"haproxy-{site}", pre + [binary, "-db", "-f", str(haproxy_config.config_path(s))], s.run_path,
            lambda: http_ok(f"http://{ip}:{h.stats_port}/metrics"), 30, "serving its stats port in its site")
        api = f"http://{ip}:{s.entry.api_port}"
        self.procs[f"entry-{site}"] = start_ready(
            f"entry-{site}", pre + [sys.executable, "-m", "control.cli", "--config", s.source, "entry"], s.run_path,
            lambda: http_ok(f"{api}/ready"), 60, "ready (/ready)")

    def _zone(self) -> None:
        self.route53 = _route53_client(self.settings)
        z = self.route53.create_hosted_zone(Name=ZONE, CallerReference=f"site-drill-{self.tag}-{time.time()}")
        self.zone_id = z["HostedZone"]["Id"].split("/")[-1]

    def _control(self, site: str) -> None:
        key = f"ctl-{site}"
        ip, c, s3 = self.spaces[key].ns_ip, self.cfg, self.settings.s3
        s = self.ctl[site] = self._derive(key, {"control": {
            "api_host": ip, "api_port": free_port(), "metrics_port": free_port(),
            "actuators": ["entries", "route53"],
            "leader": {"enabled": True, "name": key, "site": site, "lease_s": c.lease_s, "renew_s": c.renew_s,
                       "skew_margin_s": c.skew_margin_s, "takeover_target_s": c.takeover_target_s},
            "route53": {"endpoint_url": s3.url, "hosted_zone_id": self.zone_id, "record_name": RECORD,
                        "record_type": "A", "ttl": 10,
                        "targets": {x: self.spaces[x].ns_ip for x in SITES},
                        "health_checks": {x: {"port": self.entries[x].haproxy.http_port, "request_interval_s": 10}
                                          for x in SITES},
                        "access_key_id": s3.access_key_id.get_secret_value(),
                        "secret_access_key": s3.secret_access_key.get_secret_value()}}})
        m = s.control.metrics_port
        self.procs[key] = start_ready(
            key, self.spaces[key].exec_prefix() + [sys.executable, "-m", "control.cli", "--config", s.source,
                                                   "control", "run"],
            s.run_path, lambda: http_ok(f"http://{ip}:{m}/metrics"), 60, "exporting its metrics")

    def _calm(self) -> bool:
        st = self.traffic()
        if st is None or self.entry_weights("onprem") != st.instance_weights:
            return False
        if self.entry_weights("cloud") != st.instance_weights:
            return False
        return set(self.dns_weights()) == set(SITES)

    # ---- views (from the root namespace) ----------------------------------------------------------
    def leader_view(self, site: str) -> dict:
        return AdminClient(self.ctl[site], timeout=2).call("GET", "/v1/leader")

    def follows(self, site: str, leader: str) -> bool:
        v = self.leader_view(site)
        return not v["is_leader"] and v["leader"] == leader

    def traffic(self) -> TrafficState | None:
        key = control_key(self.settings.s3, "traffic.json")
        try:
            body = self.client.get_object(Bucket=self.settings.s3.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return TrafficState.model_validate_json(body)

    def versions(self, name: str, model: type[BaseModel]) -> list:
        """Every write of `_control/<name>` that landed, oldest first (bucket versioning)."""
        s3 = self.settings.s3
        key = control_key(s3, name)
        vs = self.client.list_object_versions(Bucket=s3.bucket, Prefix=key).get("Versions", [])
        out = []
        for v in sorted((v for v in vs if v["Key"] == key), key=lambda v: v["LastModified"]):
            body = self.client.get_object(Bucket=s3.bucket, Key=key, VersionId=v["VersionId"])["Body"].read()
            out.append(model.model_validate_json(body))
        return sorted(out, key=lambda d: d.revision)

    def entry_weights(self, site: str) -> dict[str, int]:
        s = self.entries[site]
        st = requests.get(f"http://{s.entry.api_host}:{s.entry.api_port}/v1/status", timeout=2,
                          headers={"Authorization": f"Bearer {self.token}"}).json()
        return st.get("instance_weights") or {} if st.get("applied_revision", -1) >= 0 else {}

    def dns_weights(self) -> dict[str, int]:
        """Site -> weight of our weighted records, as Route53 (moto) has them."""
        out = {}
        r = self.route53.list_resource_record_sets(HostedZoneId=self.zone_id, StartRecordName=RECORD,
                                                   StartRecordType="A")
        for rr in r["ResourceRecordSets"]:
            if rr["Name"] == RECORD and rr["Type"] == "A" and "SetIdentifier" in rr:
                out[rr["SetIdentifier"]] = int(rr["Weight"])
        return out

    def successes(self, site: str, model: str) -> float:
        text = requests.get(self.settings.instance(f"{site}-1").metrics_url, timeout=2).text
        return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
                   if x.name == "nv_inference_request_success" and x.labels.get("model") == model)

    def entry_urls(self, site: str) -> tuple[str, str]:
        h = self.entries[site].haproxy
        return f"{h.host}:{h.http_port}", f"{h.host}:{h.grpc_port}"

    # ---- faults ------------------------------------------------------------------------------------
    def cut(self, *keys: str) -> None:
        for k in keys:
            self.spaces[k].link_down()

    def heal(self, *keys: str) -> None:
        for k in keys:
            self.spaces[k].link_up()

    # ---- stop --------------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Every process stopped (own process groups, pid files), every namespace and the bridge removed."""
        problems = []
        for ns in self.spaces.values():   # a cut link would make the stops below wait for timeouts
            try:
                ns.link_up()
            except NetnsError:
                pass
        for key in [k for k in self.procs if k != "s3"][::-1]:
            try:
                self.procs.pop(key).stop(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                problems.append(f"{key}: {e}")
        for h in self.hosts.values():
            problems += h.stop()
        if "s3" in self.procs:
            try:
                self.procs.pop("s3").stop(timeout=10)
            except Exception as e:  # noqa: BLE001
                problems.append(f"s3: {e}")
        for ns in self.spaces.values():
            ns.destroy()
        if self.bridge is not None:
            self.bridge.destroy()
        return problems

    def __enter__(self) -> "TwoSites":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _route53_client(settings: Settings):
    """The drill's own view of Route53: moto's server, the same endpoint and keys as S3."""
    s3 = settings.s3
    return boto3.client("route53", endpoint_url=s3.url, region_name=s3.region,
                        aws_access_key_id=s3.access_key_id.get_secret_value(),
                        aws_secret_access_key=s3.secret_access_key.get_secret_value())


# Clients -------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    t: float           # wall clock when sent
    status: int        # 0: no answer
    reason: str


class SensitiveProbe:
    """Sensitive requests (haproxy.sensitive_header) at one entry at a fixed rate, HTTP, in a thread."""

    def __init__(self, url: str, header: str, rate: float, timeout_s: float = 5.0):
        self.url, self.header, self.period, self.timeout_s = url, header, 1.0 / rate, timeout_s
        self.records: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensitive-probe", daemon=True)

    def _run(self) -> None:
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
        session = requests.Session()
        while not self._stop.is_set():
            t = time.time()
            try:
                r = session.post(f"http://{self.url}/v2/models/{SENSITIVE_MODEL}/infer", json=body,
                                 headers={self.header: "1"}, timeout=self.timeout_s)
                self.records.append(Probe(t, r.status_code, r.headers.get(haproxy_config.REASON_HEADER, "")))
            except requests.RequestException:
                self.records.append(Probe(t, 0, ""))
            self._stop.wait(max(0.0, self.period - (time.time() - t)))

    def start(self) -> "SensitiveProbe":
        self._thread.start()
        return self

    def stop(self) -> list[Probe]:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 2)
        return self.records


def _start_loads(lab: TwoSites, spec: RequestSpec) -> dict[str, OpenLoopLoad]:
    out = {}
    for site in SITES:
        http, grpc = lab.entry_urls(site)
        out[site] = OpenLoopLoad(http, grpc, spec, rate=lab.cfg.rate, duration_s=3600, timeout_s=10.0,
                                 open_ended=True).start()
    return out


def _by_status(probes: list[Probe]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in probes:
        k = f"{p.status or 'no answer'}{' + reason' if p.reason else ''}"
        out[k] = out.get(k, 0) + 1
    return out


def _stop_loads(loads: dict[str, OpenLoopLoad]) -> dict[str, list]:
    for load in loads.values():
        load.stop()   # no new requests; join() waits for those in flight, each recorded
    return {site: load.join() for site, load in loads.items()}


def _failures(records) -> dict:
    failed = [r for r in records if not r.ok]
    kinds: dict[str, int] = {}
    for r in failed:
        kind = r.error.split(":")[0][:60]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"sent": len(records), "failed": len(failed), "by_kind": kinds}


def _wait_answers(loads: dict[str, OpenLoopLoad], n: int, timeout: float) -> None:
    for site, load in loads.items():
        want = len(load.records) + n
        wait_until(lambda load=load, want=want: len(load.records) >= want, timeout, f"{n} more answers at the {site} entry")


def _audit_check(lab: TwoSites) -> dict:
    now = time.time()
    spans = {site: leading_intervals(transitions(lab.ctl[site]), now) for site in SITES}
    both = overlaps(spans["onprem"], spans["cloud"])
    stray = {site: outside(applied_times(lab.ctl[site]), spans[site]) for site in SITES}
    return {"leading": {k: [[round(a, 3), round(b, 3)] for a, b in v] for k, v in spans.items()},
            "overlaps": [[list(x), list(y)] for x, y in both],
            "applied_outside_lead": {k: len(v) for k, v in stray.items()}}


# Drills ---------------------------------------------------------------------------------------------------

def site_down(lab: TwoSites) -> dict:
    cfg, say = lab.cfg, lab.say
    f: dict = {}
    loads = _start_loads(lab, add_one_spec())
    probe = SensitiveProbe(lab.entry_urls("cloud")[0], lab.settings.haproxy.sensitive_header, cfg.sensitive_rate)
    probe.start()
    try:
        _wait_answers(loads, int(cfg.rate * cfg.before_s), cfg.step_timeout_s)
        sens_cloud_before = lab.successes("cloud", SENSITIVE_MODEL)
        before_probes = len(probe.records)
        say("site-down: on-prem site and its (leading) control plane cut off")
        t_cut = time.time()
        lab.cut("onprem", "ctl-onprem")
        wait_until(lambda: lab.leader_view("cloud")["is_leader"], cfg.step_timeout_s, "ctl-cloud to lead",
                   interval=0.05)
        f["takeover_s"] = round(time.time() - t_cut, 2)
        f["generation"] = lab.leader_view("cloud")["generation"]
        wait_until(lambda: lab.dns_weights().get("onprem") == 0 and lab.dns_weights().get("cloud", 0) > 0,
                   cfg.step_timeout_s, "Route53 weights at the cloud entry only", interval=0.1)
        f["dns_cloud_only_s"] = round(time.time() - t_cut, 2)
        f["dns_during_outage"] = lab.dns_weights()
        t_led = t_cut + f["takeover_s"]
        _wait_answers({"cloud": loads["cloud"]}, int(cfg.rate * cfg.outage_s), cfg.step_timeout_s)
        sens_cloud_outage = lab.successes("cloud", SENSITIVE_MODEL) - sens_cloud_before
        say("site-down: on-prem site back")
        t_back = time.time()
        lab.heal("onprem", "ctl-onprem")
        wait_until(lambda: lab.follows("onprem", "ctl-cloud@cloud"), cfg.step_timeout_s,
                   "ctl-onprem to rejoin as standby", interval=0.1)
        f["rejoined_standby_s"] = round(time.time() - t_back, 2)
        wait_until(lambda: lab.dns_weights().get("onprem", 0) > 0, cfg.step_timeout_s + cfg.failback_healthy_s,
                   "Route53 weight back on the on-prem entry", interval=0.1)
        f["failback_s"] = round(time.time() - t_back, 2)
        t_failback = time.time()
        _wait_answers(loads, int(cfg.rate * cfg.settle_s), cfg.step_timeout_s + cfg.settle_s)
        f["after_failback"] = {"dns": lab.dns_weights(), "leader": lab.leader_view("cloud")["leader"],
                               "onprem_role": "leader" if lab.leader_view("onprem")["is_leader"] else "standby"}
        sens_cloud_total = lab.successes("cloud", SENSITIVE_MODEL) - sens_cloud_before
    finally:
        probes = probe.stop()
        records = _stop_loads(loads)
    f["cloud_entry"] = _failures(records["cloud"])
    f["onprem_entry"] = _failures(records["onprem"])
    outage = [p for p in probes[before_probes:] if t_led <= p.t < t_back]
    f["sensitive_outage"] = {
        "sent": len(outage),
        "refused_with_reason": sum(p.status == 503 and p.reason == haproxy_config.SENSITIVE_503_REASON for p in outage),
        "answered_200": sum(p.status == 200 for p in outage),
        "served_by_cloud_triton": sens_cloud_outage, "served_by_cloud_triton_whole_run": sens_cloud_total,
        "answered_200_whole_outage": sum(p.status == 200 for p in probes if t_cut <= p.t < t_back),
        # Before the cloud leads, HAProxy's own check already pins them: what those got, by status.
        "in_detection_gap": _by_status([p for p in probes if t_cut <= p.t < t_led])}
    traffic = lab.versions("traffic.json", TrafficState)
    after = [t.site_weights.get("onprem", 0) for t in traffic if t.updated_at >= t_back]
    last_out = next((t.site_weights.get("onprem", 0) for t in reversed(traffic) if t.updated_at < t_back), None)
    seq = ([last_out] if last_out is not None else []) + after
    ups, turns = onprem_moves(seq)
    f["failback"] = {"onprem_weights": seq, "moves_back": ups, "direction_changes": turns,
                     "writes_after_return": len(after), "settled_for_s": round(time.time() - t_failback, 2)}
    f["audit"] = _audit_check(lab)
    sens = f["sensitive_outage"]
    targets = [
        target("failed requests at the cloud entry", f["cloud_entry"]["failed"] == 0, f["cloud_entry"]["failed"], "0"),
        target("standby (cloud) leads", f["takeover_s"] <= cfg.takeover_target_s, f["takeover_s"],
               f"<= {cfg.takeover_target_s:g} s"),
        target("Route53 at the cloud entry only", True, f["dns_cloud_only_s"], "measured"),
        target("sensitive at the cloud entry in the outage: 503 with the reason",
               sens["sent"] > 0 and sens["refused_with_reason"] == sens["sent"],
               f"{sens['refused_with_reason']}/{sens['sent']}", "all"),
        target("sensitive requests served by the cloud Triton", sens["served_by_cloud_triton_whole_run"] == 0
               and sens["answered_200_whole_outage"] == 0, sens["served_by_cloud_triton_whole_run"], "0"),
        target("returned site rejoins as standby", f["after_failback"]["onprem_role"] == "standby"
               and f["after_failback"]["leader"] == "ctl-cloud@cloud", f["after_failback"]["onprem_role"], "standby"),
        target("failback without flapping", f["failback"]["moves_back"] >= 1 and f["failback"]["direction_changes"] == 0
               and f["failback"]["moves_back"] <= 1, f"{ups} move(s) back, {turns} direction change(s)",
               "1 move back, 0 direction changes"),
        target("two control planes never acted at once", not f["audit"]["overlaps"]
               and not any(f["audit"]["applied_outside_lead"].values()),
               f"{len(f['audit']['overlaps'])} overlaps, {sum(f['audit']['applied_outside_lead'].values())} "
               "applies outside a lead", "0, 0"),
    ]
    return {"figures": f, "targets": targets}


def control_partition(lab: TwoSites) -> dict:
    cfg, say = lab.cfg, lab.say
    f: dict = {}
    loads = _start_loads(lab, add_one_spec())
    try:
        _wait_answers(loads, int(cfg.rate * cfg.before_s), cfg.step_timeout_s)
        gen_old = lab.leader_view("onprem")["generation"]
        say("control-partition: the leading control plane's link down")
        t_cut = time.time()
        lab.cut("ctl-onprem")
        wait_until(lambda: lab.leader_view("cloud")["is_leader"], cfg.step_timeout_s, "ctl-cloud to lead",
                   interval=0.05)
        f["takeover_s"] = round(time.time() - t_cut, 2)
        gen_new = f["generation"] = lab.leader_view("cloud")["generation"]
        _wait_answers(loads, int(cfg.rate * cfg.before_s), cfg.step_timeout_s)
        t_heal = time.time()
        lab.heal("ctl-onprem")
        wait_until(lambda: lab.follows("onprem", "ctl-cloud@cloud"), cfg.step_timeout_s,
                   "ctl-onprem to follow ctl-cloud after the heal", interval=0.1)
        f["rejoined_standby_s"] = round(time.time() - t_heal, 2)
        # What the old leader sent into the cut link may still land after the heal; S3's history is
        # complete only once its requests have timed out or landed.
        landed_by = t_heal + cfg.landing_s
        wait_until(lambda: time.time() >= landed_by, cfg.landing_s + 5, "the old leader's delayed requests")
    finally:
        records = _stop_loads(loads)
    down = next((r for r in transitions(lab.ctl["onprem"]) if r["event"] == "stepped_down" and r["ts"] >= t_cut), None)
    up = next((r for r in transitions(lab.ctl["cloud"]) if r["event"] == "acquired" and r["ts"] >= t_cut), None)
    f["old_stopped_acting_s"] = round(down["ts"] - t_cut, 2) if down else None
    f["old_step_down_reason"] = down["reason"] if down else None
    f["gap_s"] = round(up["ts"] - down["ts"], 2) if down and up else None
    late = {}
    for name, model in (("desired.json", DesiredState), ("traffic.json", TrafficState)):
        writes = lab.versions(name, model)
        gens = [w.generation for w in writes]
        first_new = next((i for i, w in enumerate(writes) if w.generation >= gen_new), None)
        after = writes[first_new:] if first_new is not None else []
        late[name] = {"writes": len(writes), "generations": gens,
                      "old_after_new": sum(w.generation < gen_new for w in after),
                      "old_stamped_after_new_led": sum(w.generation <= gen_old and up is not None
                                                       and w.updated_at > up["ts"] for w in writes)}
    f["writes"] = late
    f["entries"] = {site: _failures(records[site]) for site in SITES}
    f["audit"] = _audit_check(lab)
    bad_writes = sum(v["old_after_new"] + v["old_stamped_after_new_led"] for v in late.values())
    targets = [
        target("old leader stopped acting by itself (renew_deadline)", f["old_step_down_reason"] == "renew_deadline",
               f["old_stopped_acting_s"], "stepped down, reason renew_deadline"),
        target("other site's control plane leads", f["takeover_s"] <= cfg.takeover_target_s, f["takeover_s"],
               f"<= {cfg.takeover_target_s:g} s"),
        target("old leader gap before the new one", f["gap_s"] is not None and f["gap_s"] >= 0, f["gap_s"],
               ">= 0 s (margin skew_margin_s)"),
        target("writes of the old generation landed after the new leader's", bad_writes == 0, bad_writes, "0"),
        target("desired.json carries the new generation", bool(late["desired.json"]["generations"])
               and late["desired.json"]["generations"][-1] == gen_new, late["desired.json"]["generations"][-1:],
               f"[{gen_new}]"),
        target("traffic.json carries the new generation (the new leader's fence)",
               bool(late["traffic.json"]["generations"]) and late["traffic.json"]["generations"][-1] == gen_new,
               late["traffic.json"]["generations"][-1:], f"[{gen_new}]"),
        target("failed requests at both entries", sum(v["failed"] for v in f["entries"].values()) == 0,
               sum(v["failed"] for v in f["entries"].values()), "0"),
        target("two control planes never acted at once", not f["audit"]["overlaps"]
               and not any(f["audit"]["applied_outside_lead"].values()), len(f["audit"]["overlaps"]), "0"),
    ]
    return {"figures": f, "targets": targets}


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a CI timeout, `kill`) ends the drill through its cleanup, as Ctrl-C does: the
    namespaces, the bridge and every process it started go away."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(f"signal {signum}: drill stopped, cleaning up")
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


DRILL_FUNCS = {"site-down": site_down, "control-partition": control_partition}
DRILLS = tuple(DRILL_FUNCS)


def run_site_drill(name: str, run_root: Path, cfg: SiteDrillConfig | None = None, *, say=print,
                   reports_dir: Path | None = None) -> dict:
    """Make the two sites, run drill `name`, take everything down; the report as a dict (status,
    targets, figures), also written as report.json / report.md under reports_dir when given."""
    if name not in DRILL_FUNCS:
        raise KeyError(f"unknown two-site drill {name!r}; known: {', '.join(DRILL_FUNCS)}")
    ok, why = available()
    if not ok:
        return {"scenario": name, "status": "skipped", "passed": False,
                "skip_reason": f"needs network namespaces: {why}; run it as root on a machine with iproute2"}
    run_dir = Path(run_root) / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}"
    lab = TwoSites(run_dir, cfg, say=say)
    t0 = time.monotonic()
    say(f"{name}: starting two sites (S3 + Route53, 2 Triton hosts, 2 entries, 2 control planes)")
    with _terminate_as_exit(), lab:
        say(f"{name}: two sites up in {lab.timings['start_s']:.1f}s")
        out = DRILL_FUNCS[name](lab)
        made = [ns.ns for ns in lab.spaces.values()] + [lab.bridge.name]
    links = netns.run(["ip", "-o", "link"]).stdout
    left = [n for n in made if n in netns.leftovers() or f" {n}:" in links or f" {n}@" in links]
    out["targets"].append(target("namespaces and bridge removed", not left, left, "[]"))
    out["figures"]["made"] = made
    passed = all(t["ok"] for t in out["targets"])
    rep = {"scenario": name, "status": "passed" if passed else "failed", "passed": passed,
           "targets": out["targets"], "figures": {**out["figures"], "start_s": lab.timings.get("start_s"),
                                                   "total_s": round(time.monotonic() - t0, 2)}}
    if reports_dir is not None:
        d = Path(reports_dir) / run_dir.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.json").write_text(json.dumps(rep, indent=2, default=str))
        lines = [f"# Drill {name}: {rep['status']}", "", "| target | value | goal | ok |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['name']} | {t['value']} | {t['goal']} | {'pass' if t['ok'] else 'FAIL'} |" for t in rep["targets"]]
        lines += ["", "```json", json.dumps(rep["figures"], indent=2, default=str), "```"]
        (d / "report.md").write_text("\n".join(lines) + "\n")
        rep["report_dir"] = str(d)
    return rep
