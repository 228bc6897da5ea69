"""Typed configuration for the whole stack, loaded from one YAML file with environment overrides.

Where the file comes from: ``--config`` / ``TRITON_HYBRID_CONFIG`` / ``deploy/local.yaml``.
Overrides: ``TRITON_HYBRID__<SECTION>__<FIELD>=value`` (double underscores walk into nested
sections, e.g. ``TRITON_HYBRID__S3__PORT=9100``; list items by index:
``TRITON_HYBRID__INSTANCES__0__HTTP_PORT=9100``). Values are parsed as YAML scalars.
Secrets are ``SecretStr``: they never show up in a repr, a log line or ``status --json``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "deploy" / "local.yaml"
ENV_CONFIG = "TRITON_HYBRID_CONFIG"
ENV_PREFIX = "TRITON_HYBRID__"


class ConfigError(Exception):
    """The configuration is unusable; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class S3Config(_Section):
    host: str = "127.0.0.1"
    port: int = 9000
    # Empty: the local endpoint server at host:port. Production: AWS S3 or MinIO/Ceph RGW URL.
    endpoint_url: str = ""
    bucket: str = "triton-models"
    prefix: str = "repository"
    region: str = "us-east-1"
    access_key_id: SecretStr = SecretStr("local-access-key")
    secret_access_key: SecretStr = SecretStr("local-secret-key")
    sse: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None
    start_local_server: bool = True
    multipart_threshold_mb: int = 8
    keep_versions: int = 3
    retry_attempts: int = 5
    retry_base_delay_s: float = 0.5

    @property
    def url(self) -> str:
        return self.endpoint_url or f"http://{self.host}:{self.port}"

    @field_validator("prefix")
    @classmethod
    def _strip_prefix(cls, v: str) -> str:
        return v.strip("/")


class InstanceConfig(_Section):
    name: str
    site: Literal["onprem", "cloud"]
    host: str = "127.0.0.1"
    http_port: int
    grpc_port: int
    metrics_port: int
    weight: int = Field(100, ge=0, le=256)
    capacity: float = 1.0  # relative throughput, used by the policy and the scaler
    cost_per_hour: float = 0.0
    sensitive_ok: bool = False  # may serve requests marked sensitive (data residency)
    # The local stack (`triton-hybrid up/down`, the local scaler) starts and stops this instance's
    # Triton and host agent; False for an instance run elsewhere (its host runs its own agent).
    managed: bool = True
    # Port of the instance's host agent API (/healthz, /ready, /metrics, /v1/status) on `host`:
    # needed for a managed instance, whose agent the local stack starts.
    agent_port: int | None = Field(None, ge=1, le=65535)
    # A host agent reports under this name (the rollout waits for it). False for an entry that
    # fronts several hosts, e.g. a Kubernetes Service whose pods register under their pod names.
    agent_reports: bool = True

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def agent_url(self) -> str:
        return f"http://{self.host}:{self.agent_port}" if self.agent_port else ""


class SuperviseConfig(_Section):
    """The local stack's supervisor (`triton-hybrid supervise`, started by `up`, stopped by `down`;
    control/local/supervisor.py): it restarts a managed Triton whose process died, after reaping
    what the dead one left in its process group. Production: systemd (Restart=on-failure) or the
    kubelet do this job."""

    enabled: bool = True
    poll_interval_s: float = Field(0.5, gt=0)
    # At most `max_restarts` restarts of one instance within `window_s`; then it gives up on that
    # instance (logged, shown by `status`) until `down`/`up`.
    max_restarts: int = Field(5, ge=0)
    window_s: float = Field(300.0, gt=0)
    # The first restart in a window is immediate; the n-th waits backoff_initial_s * 2**(n-2),
    # at most backoff_max_s.
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # A restart first waits up to this long for the dead process's ports to be free again: the
    # kernel keeps its closed connections bound for a moment (seen in CI: an agent's port still in
    # use 0.2 s after its kill, free 1 s later).
    port_release_s: float = Field(5.0, ge=0)
    start_timeout_s: float = Field(20.0, gt=0)  # for the supervisor itself to report in


class TritonConfig(_Section):
    # One repository-API key per instance (control/local/admin_keys.py): generated at `up` into
    # <run_dir>/secrets/<instance>.admin-key (0600), or read from `credentials_dir`, or set per
    # instance here (production, e.g. TRITON_HYBRID__TRITON__ADMIN_KEYS__<INSTANCE>).
    admin_keys: dict[str, SecretStr] = Field(default_factory=dict)
    credentials_dir: str = ""  # empty: <run_dir>/secrets
    startup_timeout_s: float = 90.0
    log_verbose: int = 0
    # Extra tritonserver flags, e.g. ["--log-info=false"].
    extra_args: list[str] = Field(default_factory=list)
    supervise: SuperviseConfig = Field(default_factory=SuperviseConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_shared_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "admin_key" in data:
            raise ValueError("triton.admin_key (one key for every instance) is gone: remove it; each instance has "
                             "its own key, generated by `up` into <run_dir>/secrets/<instance>.admin-key, read "
                             "from triton.credentials_dir, or set as triton.admin_keys.<instance>")
        return data


class ProxyLimitsConfig(_Section):
    """What one inference request may declare at the client-facing proxy (deploy/haproxy/request_guard.lua).
    Defaults match the repository's own limits (model_repository/spec.py `Limits`: max_batch_size 8,
    max_candidates 1000); the control plane does not import model_repository, so they are repeated
    here: change both together."""

    max_body_bytes: int = Field(262144, ge=4096, le=64 * 1024 * 1024)
    max_elements: int = Field(8000, ge=1)      # per input: product of its declared shape (8 x 1000)
    max_batch: int = Field(8, ge=1)            # first dimension of every input
    max_candidates: int = Field(1000, ge=1)    # per query (elements per batch row) of `candidate_inputs`
    candidate_inputs: list[str] = Field(default_factory=lambda: ["CANDIDATE_IDS"])

    @model_validator(mode="after")
    def _consistent(self) -> "ProxyLimitsConfig":
        if self.max_candidates > self.max_elements:
            raise ValueError("max_candidates must not exceed max_elements (one query's candidates are one input)")
        for name in self.candidate_inputs:
            if not name or any(c in name for c in ", \t"):
                raise ValueError(f"candidate input name {name!r} must be a plain tensor name (no comma or space)")
        return self


# HAProxy `retry-on` keywords that re-send a request the server already received and died on
# (a query of death would crash every server in turn): refused in haproxy.retry_on.
REPLAYING_RETRY_ON = ("empty-response", "junk-response", "all-retryable-errors")


class HAProxyConfig(_Section):
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    stats_port: int = 8404  # stats page + Prometheus exporter at /metrics
    binary: str = "haproxy"
    sensitive_header: str = "X-Data-Sensitive"
    health_interval_ms: int = 500
    health_fall: int = 2
    health_rise: int = 2
    timeout_connect_ms: int = 500
    timeout_server_ms: int = 10000
    # Retry budget: a request is re-sent at most `retries` times (each to another server), and only
    # where the server never received it (conn-failure: a Triton killed a moment ago) or did not
    # answer within timeout_server_ms (response-timeout: a hung one), never after a server dropped
    # the connection on it (see REPLAYING_RETRY_ON). One retry: a request that hangs a server reaches
    # at most two servers; keep timeout_server_ms above the slowest legitimate answer.
    retries: int = Field(1, ge=0, le=5)
    retry_on: list[str] = Field(default_factory=lambda: ["conn-failure", "response-timeout", "0rtt-rejected",
                                                         "503", "504"])
    # Only these models are reachable through the proxy (infer, ready, metadata, config, stats);
    # the ensemble's step models, the repository/logging/trace/shared-memory APIs are refused (403).
    served_models: list[str] = Field(default_factory=lambda: ["search_ranking"], min_length=1)
    # Read-only through the proxy (config, metadata, ready, stats; never infer): the served
    # ensemble's steps (model_repository/spec.py), whose configs Triton's own clients read:
    # perf_analyzer parses every step's config of an ensemble it measures.
    readable_models: list[str] = Field(default_factory=lambda: [
        "preprocess", "query_intent", "feature_lookup", "ranker", "postprocess"])
    # Statistics of all models in one call (`/v2/models/stats`, gRPC ModelStatistics with no name):
    # perf_analyzer asks for them on every measurement; False refuses them (and breaks perf_analyzer).
    all_model_stats: bool = True
    # The Lua request guard (allowlist + declared-shape checks); off only to measure its cost.
    guard: bool = True
    limits: ProxyLimitsConfig = Field(default_factory=ProxyLimitsConfig)

    @field_validator("retry_on")
    @classmethod
    def _no_replay(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x in REPLAYING_RETRY_ON]
        if bad:
            raise ValueError(f"{bad} would re-send a request that a server dropped the connection on to the next "
                             "server: one query of death then crashes every server in turn. Use conn-failure, "
                             "response-timeout, 0rtt-rejected or status codes")
        if not v:
            raise ValueError("retry_on must name at least one condition (conn-failure keeps failover without loss)")
        return v

    @field_validator("served_models", "readable_models")
    @classmethod
    def _model_names(cls, v: list[str]) -> list[str]:
        for m in v:
            if not m or any(c in m for c in "/%, \t\"'"):
                raise ValueError(f"served model name {m!r} must be a plain Triton model name")
        return v


class PolicyConfig(_Section):
    """Knobs of the traffic policy (a pure function in control/traffic/policy.py). Weights are per site,
    0..100, onprem + cloud = 100."""

    # Which load signal: "auto" = GPU utilization where the site reports GPUs, else CPU;
    # "none" = queue time only (e.g. two Tritons sharing one host share its CPU utilization).
    util_signal: Literal["auto", "gpu", "cpu", "none"] = "auto"
    onprem_util_high: float = 0.80
    onprem_util_low: float = 0.50
    queue_time_high_ms: float = 20.0
    queue_time_low_ms: float = 5.0
    sustain_ticks: int = Field(3, ge=1)        # consecutive hot (or cool) ticks before a step
    max_step: int = Field(20, ge=1, le=100)    # weight points moved per step
    # Where the weight returns when calm. 99, not 100: HAProxy never redispatches a failed request
    # to a weight-0 server, so a cloud kept at 1 is what lets retries land there in the second
    # before the policy fails over (measured: onprem-crash lost 83 requests at 100/0, 0 at 99/1).
    home_onprem_weight: int = Field(99, ge=0, le=100)
    min_onprem_weight: int = Field(0, ge=0, le=100)     # scaling never goes below (failover/drain may)
    max_cloud_weight: int = Field(100, ge=0, le=100)    # scaling never goes above
    cooldown_s: float = 3.0                    # minimum time between two weight changes by scaling
    failback_healthy_s: float = 10.0           # a failed site must stay healthy this long
    stale_after_s: float = 5.0                 # metrics older than this make an instance unknown
    # Health is judged over the last `health_window` readiness probes (control/traffic/health.py):
    # an instance is down when `health_failures_to_down` of them were refused / not 200, or when
    # HAProxy's own health check reports it DOWN. A slow probe (timeout) is "degraded", not down,
    # and HAProxy reporting the server UP overrides our probes: a rollout never fails a site over.
    health_window: int = Field(3, ge=1, le=20)
    health_failures_to_down: int = Field(2, ge=1, le=20)
    # Anti-flap for queue/util signals that fall as soon as weight moves away: on-prem's request
    # rate when it was last hot is remembered (its saturation point); scaling in only happens if
    # the projected on-prem rate at the new weight stays below `scale_in_headroom` x that rate.
    scale_in_headroom: float = Field(0.8, gt=0, le=1.0)
    saturation_memory_s: float = 300.0

    @model_validator(mode="after")
    def _bands(self) -> "PolicyConfig":
        if self.onprem_util_low >= self.onprem_util_high:
            raise ValueError("onprem_util_low must be below onprem_util_high (hysteresis band)")
        if self.queue_time_low_ms >= self.queue_time_high_ms:
            raise ValueError("queue_time_low_ms must be below queue_time_high_ms (hysteresis band)")
        if self.min_onprem_weight + self.max_cloud_weight < 100:
            raise ValueError("min_onprem_weight + max_cloud_weight must be at least 100")
        if self.health_failures_to_down > self.health_window:
            raise ValueError("health_failures_to_down must not exceed health_window (k of the last n probes)")
        return self


class Route53HealthCheckConfig(_Section):
    """The Route53 health check on one site's entry (its HAProxy). Route53 stops answering with a
    record whose check fails, so losing a site's entry costs its clients one DNS TTL."""

    # FQDN or IP address of the entry; empty: the site's record value (`targets`), an FQDN for a
    # CNAME record, an address for an A/AAAA one.
    address: str = Field("", max_length=255)
    port: int = Field(8000, ge=1, le=65535)          # HAProxy's HTTP frontend (haproxy.http_port)
    # Through the entry to a Triton: healthy only when the entry forwards to a ready Triton.
    path: str = "/v2/health/ready"
    type: Literal["HTTP", "HTTPS"] = "HTTP"
    request_interval_s: Literal[10, 30] = 30         # the two intervals Route53 offers
    failure_threshold: int = Field(3, ge=1, le=10)   # consecutive failures before unhealthy

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or len(v) > 255:
            raise ValueError("path must start with '/' and be at most 255 characters (Route53 ResourcePath)")
        return v


class Route53Config(_Section):
    """Weighted DNS records, one per site entry, for `record_name` (DNS between the sites), each
    with a Route53 health check on its entry."""

    endpoint_url: str = ""          # empty: AWS; tests: the local moto server
    region: str = "us-east-1"
    hosted_zone_id: str = ""
    record_name: str = "triton.search.example.com."
    record_type: Literal["A", "AAAA", "CNAME"] = "CNAME"
    ttl: int = Field(30, ge=0)
    targets: dict[str, str] = Field(default_factory=lambda: {
        "onprem": "triton.onprem.example.com.", "cloud": "triton.cloud.example.com."})
    # Per site; a site in `targets` without an entry here gets the defaults (address: its target).
    health_checks: dict[str, Route53HealthCheckConfig] = Field(default_factory=dict)
    # The health checks are re-read this often (a hand edit or deletion is repaired); the records
    # are read back every apply.
    health_check_verify_s: float = Field(300.0, gt=0)
    # Every Route53 call: a slow or unreachable API delays the tick (the other actuators are
    # applied first), bounded by timeout_s x max_attempts.
    timeout_s: float = Field(3.0, gt=0)
    max_attempts: int = Field(2, ge=1, le=10)
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    @model_validator(mode="after")
    def _sites(self) -> "Route53Config":
        extra = sorted(set(self.health_checks) - set(self.targets))
        if extra:
            raise ValueError(f"health_checks has sites without a target: {extra}; add them to targets "
                             f"(the record value of each site entry) or remove them")
        return self

    def health_check(self, site: str) -> Route53HealthCheckConfig:
        return self.health_checks.get(site) or Route53HealthCheckConfig()


class ScalerConfig(_Section):
    """Elastic cloud capacity (control/capacity/scaler.py, a pure function; control/capacity/actuators.py).

    Out: the cloud's share of traffic >= `out_min_cloud_weight` and its load high (utilization >
    `util_high`, queue time > `queue_ms_high`, or requests/s per capacity unit >
    `rps_per_capacity_high` when set) for `sustain_ticks` ticks, at most once per
    `out_cooldown_s`, below `max_instances` and within `budget_per_hour`. In: the cloud's share <=
    `in_max_cloud_weight` and requests/s per capacity < `rps_per_capacity_low` (idle) for
    `idle_cooldown_s`, above `min_instances`, never an instance with requests in flight."""

    enabled: bool = False
    actuator: Literal["local", "asg", "k8s", "dry-run"] = "local"
    interval_s: float = 5.0
    min_instances: int = Field(1, ge=0)
    max_instances: int = Field(4, ge=0)
    util_signal: Literal["auto", "gpu", "cpu", "none"] = "auto"
    util_high: float = 0.80
    util_low: float = 0.20
    queue_ms_high: float = 20.0
    rps_per_capacity_high: float | None = None
    rps_per_capacity_low: float = 1.0
    out_min_cloud_weight: int = Field(50, ge=0, le=100)
    in_max_cloud_weight: int = Field(10, ge=0, le=100)
    sustain_ticks: int = Field(3, ge=1)
    out_cooldown_s: float = 120.0
    idle_cooldown_s: float = 600.0
    # Hourly budget for the whole cloud site (sum of cost_per_hour of its running instances);
    # None: no cap. Scale-out that would exceed it is refused (`budget_cap`); above it: scale in.
    budget_per_hour: float | None = None
    # New instances copy site, capacity, cost_per_hour, host from this registry instance
    # (empty: the first cloud instance) and are named `<name_prefix><n>`.
    template_instance: str = ""
    name_prefix: str = "cloud-"
    ready_timeout_s: float = 90.0
    drain_timeout_s: float = 60.0
    # AWS Auto Scaling group (actuator "asg"); endpoint_url empty: AWS.
    asg_name: str = ""
    asg_endpoint_url: str = ""
    asg_region: str = "us-east-1"
    # Kubernetes (actuator "k8s"): patch `replicas` of `k8s_deployment` in `k8s_manifest`, or,
    # with k8s_mode "kubectl", run `kubectl scale deployment/NAME --replicas=N -n NAMESPACE`.
    k8s_mode: Literal["manifest", "kubectl"] = "manifest"
    k8s_manifest: str = ""
    k8s_deployment: str = "triton-cloud"
    k8s_namespace: str = "triton-cloud"
    kubectl: str = "kubectl"

    @model_validator(mode="after")
    def _limits(self) -> "ScalerConfig":
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must not exceed max_instances")
        if self.in_max_cloud_weight >= self.out_min_cloud_weight:
            raise ValueError("in_max_cloud_weight must be below out_min_cloud_weight (hysteresis band)")
        return self


class RolloutConfig(_Section):
    """Knobs of the rollout phase machine (control/rollout/phases.py, a pure function), in the spirit of
    Flagger's canary analysis (its names in the comments). A new version goes to a canary (a count
    of instances, or a share of each site), is compared every `interval_s` with the stable instances
    of the SAME site, then promoted in waves of at most `wave_size` reloading instances."""

    enabled: bool = True
    start_on_publish: bool = True     # a newly published version starts a rollout by itself
    # The canary: `canary_instances` instances in all (spread over the sites), or, when
    # `canary_share_per_site` is set, that share of each site's instances (at least one). A site
    # always keeps one stable instance: the baseline the canary is compared with.
    canary_instances: int = Field(1, ge=1)
    canary_share_per_site: float | None = Field(None, gt=0, lt=1)
    # When no site has a second instance live at stable (one Triton per site, as the local stack):
    # the canary is compared with ITS OWN stable version over the `analysis_window_s` before it
    # switched (same hardware; the traffic may have changed). False: such a rollout waits, then stops.
    lone_instance_self_baseline: bool = True
    interval_s: float = Field(10.0, gt=0)           # Flagger analysis.interval
    analysis_window_s: float = Field(60.0, gt=0)    # how long the canary must be judged (~ iterations x interval)
    max_failed_checks: int = Field(3, ge=1)         # Flagger analysis.threshold
    max_error_rate_delta: float = Field(0.01, ge=0, le=1)  # canary error ratio minus the site's stable one
    # canary / baseline mean request time over the window (Triton's p99 is a sliding summary
    # reaching back before the window: shown, judged only where a side has no mean)
    max_latency_ratio: float = Field(1.5, gt=1)
    # ... and at least this much slower in absolute terms: a ratio of two tiny times is noise.
    min_latency_delta_ms: float = Field(1.0, ge=0)
    min_requests: int = Field(100, ge=1)            # per side in the window before judging
    canary_step_weight: int = Field(25, ge=0, le=100)  # Flagger stepWeight (% of the instance's own weight)
    canary_max_weight: int = Field(100, ge=1, le=100)  # Flagger maxWeight
    wave_size: int = Field(1, ge=1)                 # at most this many instances reloading at once
    progress_deadline_s: float = Field(600.0, gt=0)  # Flagger progressDeadlineSeconds
    on_unreachable: Literal["stop", "skip"] = "stop"  # at the deadline: stop the rollout, or go on without it
    status_stale_s: float = Field(30.0, gt=0)       # an agent status older than this is "not reporting"
    # A status this old, of an instance not in the registry (`instances`), is a decommissioned host
    # (scaled in, replaced): waves neither wait for it nor stop on it.
    forget_after_s: float = Field(3600.0, gt=0)
    scrape_timeout_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _one_canary_size(self) -> "RolloutConfig":
        if self.canary_share_per_site is not None and "canary_instances" in self.model_fields_set:
            raise ValueError("set one of canary_instances or canary_share_per_site, not both")
        if self.forget_after_s <= self.status_stale_s:
            raise ValueError("forget_after_s must be above status_stale_s")
        if self.analysis_window_s < self.interval_s:
            raise ValueError("analysis_window_s must be at least interval_s (one check per interval)")
        return self


class LeaderConfig(_Section):
    """Active/standby control planes across sites (control/leader/, docs/leader.md): a lease in the
    S3 mirror (`<prefix>/_control/leader.json`), written with conditional requests; only its holder
    acts (weights, scaling, desired state), and every desired-state write carries the lease's
    generation (a fencing token).

    Timing (docs/leader.md, "Why it is safe"): the leader stops acting `lease_s - skew_margin_s`
    after it SENT its last successful renewal; a standby takes over only when the lease is older than
    `lease_s + skew_margin_s` by its wall clock, or unchanged for `lease_s` by its own monotonic
    clock. Between the two there is always at least `skew_margin_s`, as long as the sites' wall
    clocks differ by less than `skew_margin_s`. Worst-case takeover after the leader dies:
    lease_s + skew_margin_s + renew_s (<= takeover_target_s, checked)."""

    enabled: bool = False
    # This control plane's name in the lease (status, audit); empty: the host name. Two processes
    # with one name are still told apart (each holds a random session id in the lease).
    name: str = Field("", max_length=128)
    site: Literal["onprem", "cloud"] = "onprem"
    lease_s: float = Field(5.0, gt=0)          # a renewal keeps the lease this long
    renew_s: float = Field(1.0, gt=0)          # the leader renews, a standby re-reads, this often
    skew_margin_s: float = Field(1.0, gt=0)    # bound on the wall-clock difference between sites
    # One lease request (connect, then read) gives up after this long; no retries: the next round
    # is the retry. A hung S3 never holds the leader past its own deadline (leadership is a time).
    s3_timeout_s: float = Field(1.0, gt=0)
    takeover_target_s: float = Field(10.0, gt=0)  # the bound the timing above must fit in
    release_on_stop: bool = True               # a clean stop hands the lease over at once

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if any(not (c.isalnum() or c in "-_.@:") for c in v):
            raise ValueError(f"leader name {v!r} may only hold letters, digits and - _ . @ :")
        return v

    @model_validator(mode="after")
    def _timing(self) -> "LeaderConfig":
        act = self.lease_s - self.skew_margin_s
        if act < 2 * self.renew_s:
            raise ValueError(f"lease_s - skew_margin_s ({act:g}s) must leave room for at least two renewals "
                             f"(2 x renew_s = {2 * self.renew_s:g}s): raise lease_s or lower renew_s")
        if self.s3_timeout_s > self.renew_s:
            raise ValueError(f"s3_timeout_s ({self.s3_timeout_s:g}s) must not exceed renew_s ({self.renew_s:g}s): "
                             "a hung request would swallow renewals")
        worst = self.lease_s + self.skew_margin_s + self.renew_s
        if worst > self.takeover_target_s:
            raise ValueError(f"worst-case takeover lease_s + skew_margin_s + renew_s = {worst:g}s exceeds "
                             f"takeover_target_s ({self.takeover_target_s:g}s): lower lease_s or renew_s")
        return self


class ControlConfig(_Section):
    api_host: str = "127.0.0.1"
    api_port: int = 8300
    metrics_port: int = 8301
    prometheus_port: int = 9090  # `up --with-prometheus`
    admin_token: SecretStr = SecretStr("change-me-admin-token")
    # Admin API (flask on waitress): a connection idle this long while sending its request (headers
    # or body) is closed; the request is only handed to the app once it is complete.
    api_timeout_s: int = Field(5, ge=1, le=300)
    api_max_body_bytes: int = Field(64 * 1024, ge=1024)
    api_max_header_bytes: int = Field(16 * 1024, ge=1024)
    api_threads: int = Field(4, ge=1, le=64)
    # Manual overrides (`weights set --ttl`): shorter ones are refused, as are longer ones.
    override_min_ttl_s: float = Field(1.0, gt=0)
    override_max_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 0.8
    decide_interval_s: float = 1.0
    # The operator state (overrides, drains: _control/operator.json in S3) is re-read at most this
    # often (a conditional GET), and at once when this control plane starts to lead (docs/traffic.md).
    operator_refresh_s: float = Field(5.0, gt=0)
    # The routing layers the decided weights are applied to, each at every tick, in this order;
    # the first is the source of the observed state (weights, health): haproxy first when listed.
    # Two sites: [haproxy, route53] (each site's HAProxy and the DNS records between the sites), or
    # [entries, route53]: the weights go to S3 (_control/traffic.json) and every site entry's agent
    # applies them to its own HAProxy (docs/traffic.md "Site entries").
    actuators: list[Literal["haproxy", "route53", "entries", "dry-run"]] = Field(default_factory=lambda: ["haproxy"])
    # Optional DCGM exporter per instance name, e.g. {"onprem-1": "http://10.0.0.5:9400/metrics"}.
    dcgm_exporter_urls: dict[str, str] = Field(default_factory=dict)
    route53: Route53Config = Field(default_factory=Route53Config)
    audit_retention_h: float = 72.0
    database: str = "control.db"  # relative to run_dir
    start_daemon: bool = True
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    scaler: ScalerConfig = Field(default_factory=ScalerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    leader: LeaderConfig = Field(default_factory=LeaderConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_single_actuator(cls, data: Any) -> Any:
        # One way to say it: the single-valued field of earlier releases is refused with the new form.
        if isinstance(data, dict) and "actuator" in data:
            raise ValueError(f"control.actuator was replaced by the list control.actuators: write "
                             f"`actuators: [{data['actuator']}]` (or [haproxy, route53] for both layers)")
        return data

    @field_validator("actuators", mode="before")
    @classmethod
    def _actuators_list(cls, v: Any) -> Any:
        # An environment override gives a string: "haproxy,route53" or "[haproxy, route53]".
        if isinstance(v, str):
            return [p.strip() for p in v.strip("[]").split(",") if p.strip()]
        return v

    @field_validator("actuators")
    @classmethod
    def _actuators(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one actuator, e.g. [haproxy] or [haproxy, route53]")
        if len(set(v)) != len(v):
            raise ValueError(f"each actuator once: {v}")
        if "dry-run" in v and len(v) > 1:
            raise ValueError("dry-run stands alone (it changes nothing): [dry-run]")
        if "haproxy" in v and v[0] != "haproxy":
            raise ValueError(f"list haproxy first ({v}): its observed weights and health are the traffic "
                             f"job's source")
        return v

    @model_validator(mode="after")
    def _ttl_range(self) -> "ControlConfig":
        if self.override_min_ttl_s > self.override_max_ttl_s:
            raise ValueError("override_min_ttl_s must not exceed override_max_ttl_s")
        return self


class AgentConfig(_Section):
    """The host agent beside one Triton (control/agent/, docs/agent.md): the only writer of that host's
    model repository. It reads the desired state from the S3 mirror, pulls and verifies versions, loads
    them through Triton's repository API on the host's own loopback and reports its status to S3."""

    instance: str = ""                       # this host's instance name: its status key in S3
    site: Literal["onprem", "cloud"] = "onprem"
    # Triton's HTTP endpoint on this host's loopback (repository API + smoke inference).
    triton_url: str = "http://127.0.0.1:8000"
    # The directory Triton serves (--model-repository, explicit model-control mode).
    repository_dir: str = "/var/lib/triton-hybrid/repository"
    # Staging, per-version metadata and the failure record; must be on the repository's filesystem
    # (a verified version is renamed into place). Empty: <repository_dir>.agent beside it.
    state_dir: str = ""
    interval_s: float = Field(10.0, gt=0)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8400, ge=0, le=65535)
    api_threads: int = Field(2, ge=1, le=16)
    api_timeout_s: int = Field(5, ge=1, le=300)  # a connection idle this long mid-request is closed
    # Bearer token of /v1/status (one per host); or read from token_file (mode 600).
    token: SecretStr = SecretStr("")
    token_file: str = ""
    # This instance's own Triton repository-API key; or read from admin_key_file (mode 600).
    admin_key: SecretStr = SecretStr("")
    admin_key_file: str = ""
    keep_versions: int = Field(3, ge=1)      # version directories kept per model on the host
    load_timeout_s: float = Field(120.0, gt=0)   # a load (candidate or live) until READY
    smoke_timeout_s: float = Field(30.0, gt=0)   # one smoke inference
    pull_chunk_bytes: int = Field(1024 * 1024, ge=4096)
    # Cap on the download rate, so a pull does not starve the host's serving traffic; None: no cap.
    pull_bandwidth_mb_s: float | None = Field(None, gt=0)
    # What the agent registers in S3 for the control plane (addresses reachable from it).
    advertise_http_url: str = ""
    advertise_grpc_url: str = ""
    advertise_metrics_url: str = ""
    advertise_agent_url: str = ""
    capacity: float = Field(1.0, gt=0)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path(f"{Path(self.repository_dir)}.agent")


class EntryConfig(_Section):
    """A site's client entry agent (control/entry/, docs/traffic.md "Site entries"): beside one HAProxy
    of a site, it reads the weights the control plane decided (`_control/traffic.json` in S3), applies
    them to its own HAProxy through the local runtime socket (a unix socket, never on the network) and
    reports what HAProxy has to `_control/entries/<site>-<name>.json`."""

    site: Literal["onprem", "cloud"] = "onprem"
    name: str = "lb-1"                 # this entry within its site (LB host, pod name)
    socket: str = ""                   # HAProxy's runtime socket; empty: <run_dir>/haproxy.sock
    interval_s: float = Field(2.0, gt=0)
    # The last applied traffic state, so a restarted agent applies it again while S3 is gone.
    # Empty: <run_dir>/entry-<site>-<name>.state.json
    state_file: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = Field(8410, ge=0, le=65535)
    api_threads: int = Field(2, ge=1, le=16)
    api_timeout_s: int = Field(5, ge=1, le=300)
    # Bearer token of /v1/status; or read from token_file (mode 600).
    token: SecretStr = SecretStr("")
    token_file: str = ""
    # The control plane ignores an entry report older than this (the entry is gone or cut off).
    report_stale_s: float = Field(30.0, gt=0)


class ModelsConfig(_Section):
    exports_dir: str = "artifacts/exports"
    repository_dir: str = "model_repository/generated/cpu"
    target: Literal["cpu", "gpu"] = "cpu"
    # Export profile `make demo` builds when no export exists yet.
    profile: Literal["tiny", "full"] = "full"


class Settings(_Section):
    run_dir: str = ".run"
    s3: S3Config = Field(default_factory=S3Config)
    triton: TritonConfig = Field(default_factory=TritonConfig)
    haproxy: HAProxyConfig = Field(default_factory=HAProxyConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    entry: EntryConfig = Field(default_factory=EntryConfig)
    instances: list[InstanceConfig] = Field(default_factory=list)
    # Where this config came from; relative paths resolve against the project root.
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        names = [i.name for i in self.instances]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"instance names must be unique, repeated: {sorted(dup)}")
        ports: dict[tuple[str, int], str] = {}
        own = [
            ("s3", self.s3.host, self.s3.port),
            ("haproxy http", self.haproxy.host, self.haproxy.http_port),
            ("haproxy grpc", self.haproxy.host, self.haproxy.grpc_port),
            ("haproxy stats", self.haproxy.host, self.haproxy.stats_port),
            ("control api", self.control.api_host, self.control.api_port),
            ("control metrics", self.control.api_host, self.control.metrics_port),
        ]
        for idx, i in enumerate(self.instances):
            own += [(f"{i.name} http", i.host, i.http_port), (f"{i.name} grpc", i.host, i.grpc_port),
                    (f"{i.name} metrics", i.host, i.metrics_port)]
            if i.agent_port:
                own.append((f"{i.name} agent", i.host, i.agent_port))
            elif i.managed:
                raise ValueError(f"instances[{idx}] ({i.name}) is managed (the local stack starts its Triton and "
                                 "its host agent) but has no agent_port: set a free port for its agent, or "
                                 "managed: false for an instance run elsewhere")
        for what, host, port in own:
            if (host, port) in ports:
                raise ValueError(f"port {port} is used twice: by {ports[(host, port)]} and by {what}")
            ports[(host, port)] = what
        return self

    # Paths -----------------------------------------------------------------------------------
    def path(self, p: str | Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def run_path(self) -> Path:
        return self.path(self.run_dir)

    @property
    def database_path(self) -> Path:
        return self.run_path / self.control.database

    def instance(self, name: str) -> InstanceConfig:
        for i in self.instances:
            if i.name == name:
                return i
        known = ", ".join(i.name for i in self.instances) or "none"
        raise ConfigError(f"unknown instance {name!r} (known: {known})")

    def site_instances(self, site: str) -> list[InstanceConfig]:
        return [i for i in self.instances if i.site == site]


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env_overrides(data: dict, environ: dict[str, str]) -> dict:
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{key}: {part!r} is not an index of that list (0..{len(node) - 1})")
                if last:
                    node[int(part)] = _parse_scalar(raw)
                else:
                    node = node[int(part)]
            else:
                if last:
                    node[part] = _parse_scalar(raw)
                else:
                    node = node.setdefault(part, {})
    return data


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None,
                overrides: dict | None = None) -> Settings:
    """Load the settings; raise ConfigError naming the file and field on any problem."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(path or environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (set {ENV_CONFIG} or pass --config)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    if overrides:
        data = deep_merge(data, overrides)
    data = apply_env_overrides(data, environ)
    data["source"] = str(path)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"config file {path} is invalid:\n" + "\n".join(lines)) from None


def plain_dump(obj: Any) -> Any:
    """`model_dump()` output (or a model) with SecretStr values in clear: for a config file that a
    child process (a daemon, an agent) reads, which its writer keeps mode 600."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if isinstance(obj, SecretStr):
        return obj.get_secret_value()
    if isinstance(obj, dict):
        return {k: plain_dump(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_dump(v) for v in obj]
    return obj


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
