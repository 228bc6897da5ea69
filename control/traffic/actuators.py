"""Actuators: make the routing layer match a `Plan`, then read back what it really is.

    apply(plan) -> Observed      set what differs, read back, raise ActuatorError if it still differs
    observe()   -> Observed      read only (drift check, restart recovery, HAProxy's health view)
    set_instances(instances)     the registry changed (an instance added or removed at run time)

HAProxy (default): instance weights on every server named like an instance in the shared
backends (`be_triton_http`, `be_triton_grpc`), drain/ready on those and on the on-prem-only
sensitive backends. Route53 (control/adapters/route53.py): one weighted, health-checked record per
site entry. Dry-run: logs, remembers. `control.actuators` names one or several: several make a
`CompositeActuator` (two sites: [haproxy, route53]) that applies the same plan to each.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from control.adapters import haproxy_config
from control.adapters.haproxy_runtime import HAProxyError, HAProxyRuntime

log = logging.getLogger(__name__)


class ActuatorError(RuntimeError):
    """A routing layer could not be observed or set. `by_actuator`: the message of each layer that
    failed, by actuator name, where several were applied (CompositeActuator)."""

    def __init__(self, message: str, by_actuator: dict[str, str] | None = None):
        super().__init__(message)
        self.by_actuator = dict(by_actuator or {})


@dataclass(frozen=True)
class Plan:
    site_weights: dict[str, int]
    instance_weights: dict[str, int]
    drained: frozenset[str] = frozenset()   # instance names to drain


@dataclass
class Observed:
    instance_weights: dict[str, int] = field(default_factory=dict)   # from the first shared backend
    drained: set[str] = field(default_factory=set)
    servers: list[dict] = field(default_factory=list)                # every backend/server, for status
    site_weights: dict[str, int] | None = None
    # The routing layer's own health verdict per instance (HAProxy: srv_op_state of its health
    # check), only where it has one: an instance missing here has no verdict (control/traffic/health.py).
    health: dict[str, bool] = field(default_factory=dict)
    # Several actuators (CompositeActuator): the site weights each layer shows, and the error of
    # each one that could not be read. Empty with one actuator.
    layers: dict[str, dict[str, int] | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"instance_weights": self.instance_weights, "drained": sorted(self.drained),
               "site_weights": self.site_weights, "servers": self.servers, "health": self.health}
        if self.layers or self.errors:
            out["layers"] = self.layers
            out["errors"] = self.errors
        return out


@dataclass
class ApplyResult:
    observed: Observed
    commands: list[str]
    drift: list[str]  # what differed from the plan before we applied (hand edit, restart)
    # Several actuators: the error of each one that failed while the others applied.
    errors: dict[str, str] = field(default_factory=dict)


class WeightActuator(Protocol):
    """What the traffic job needs of a routing layer (HAProxy, Route53, dry-run)."""

    name: str

    def apply(self, plan: Plan) -> ApplyResult: ...

    def observe(self) -> Observed: ...

    def set_instances(self, instances) -> None: ...


def site_weights_from_instances(instance_weights: dict[str, int], instances) -> dict[str, int] | None:
    tot = {"onprem": 0, "cloud": 0}
    for i in instances:
        tot[i.site] += instance_weights.get(i.name, 0)
    s = tot["onprem"] + tot["cloud"]
    if s <= 0:
        return None
    on = round(100 * tot["onprem"] / s)
    return {"onprem": on, "cloud": 100 - on}


class HAProxyActuator:
    name = "haproxy"

    def __init__(self, runtime: HAProxyRuntime, instances, backends: list[str], sensitive_backends: list[str]):
        self.rt = runtime
        self.backends = list(backends)
        self.sensitive_backends = list(sensitive_backends)
        self.set_instances(instances)

    def set_instances(self, instances) -> None:
        self.instances = list(instances)
        self.names = {i.name for i in self.instances}

    def _servers(self):
        return [s for s in self.rt.servers() if s.server in self.names
                and (s.backend in self.backends or s.backend in self.sensitive_backends)]

    def observe(self) -> Observed:
        try:
            servers = self._servers()
        except HAProxyError as e:
            raise ActuatorError(str(e)) from None
        if not servers:
            raise ActuatorError(f"HAProxy has no server named like an instance in {self.backends}")
        first = self.backends[0]
        weights = {s.server: s.weight for s in servers if s.backend == first}
        drained = {s.server for s in servers if s.backend == first and s.admin != "ready"}
        # HAProxy's health check verdict: UP if any shared backend that checks it (not in
        # maintenance, where checks stop) sees it UP; DOWN if all of them see it down.
        checked: dict[str, list[bool]] = {}
        for s in servers:
            if s.backend in self.backends and s.admin != "maint":
                checked.setdefault(s.server, []).append(s.up)
        health = {name: any(ups) for name, ups in checked.items()}
        return Observed(weights, drained, [s.to_dict() for s in servers],
                        site_weights_from_instances(weights, self.instances), health)

    def _diff(self, servers, plan: Plan) -> list[tuple[str, str, str, object]]:
        todo = []
        for s in servers:
            shared = s.backend in self.backends
            want_admin = "drain" if s.server in plan.drained else "ready"
            if shared and s.weight != plan.instance_weights.get(s.server, 0):
                todo.append(("weight", s.backend, s.server, plan.instance_weights.get(s.server, 0)))
            if s.admin != want_admin:
                todo.append(("state", s.backend, s.server, want_admin))
        return todo

    def apply(self, plan: Plan) -> ApplyResult:
        try:
            servers = self._servers()
            todo = self._diff(servers, plan)
            cmds = []
            for kind, be, srv, val in todo:
                if kind == "weight":
                    self.rt.set_weight(be, srv, int(val))
                    cmds.append(f"set weight {be}/{srv} {val}")
                else:
                    self.rt.set_state(be, srv, str(val))
                    cmds.append(f"set server {be}/{srv} state {val}")
            missing = [(be, n) for be in self.backends for n in self.names
                       if not any(s.backend == be and s.server == n for s in servers)]
            if missing:
                raise ActuatorError(f"HAProxy lacks servers {['/'.join(m) for m in missing]}")
            # Read back: the real state must now match the plan.
            after = self._servers()
            left = self._diff(after, plan)
            if left:
                raise ActuatorError(f"HAProxy state still differs after apply: {left}")
        except HAProxyError as e:
            raise ActuatorError(str(e)) from None
        obs = self.observe()
        return ApplyResult(obs, cmds, [f"{k} {be}/{srv} -> {v}" for k, be, srv, v in todo])


class DryRunActuator:
    name = "dry-run"

    def __init__(self, instances):
        self.instances = list(instances)
        self.current = Observed({i.name: i.weight for i in self.instances}, set())
        self.current.site_weights = site_weights_from_instances(self.current.instance_weights, self.instances)

    def set_instances(self, instances) -> None:
        self.instances = list(instances)

    def observe(self) -> Observed:
        return self.current

    def apply(self, plan: Plan) -> ApplyResult:
        drift = []
        if self.current.instance_weights != plan.instance_weights or self.current.drained != set(plan.drained):
            drift = [f"weights {self.current.instance_weights} -> {plan.instance_weights}"]
            log.info("dry-run: would set weights %s, drained %s", plan.instance_weights, sorted(plan.drained))
        self.current = Observed(dict(plan.instance_weights), set(plan.drained), [], dict(plan.site_weights))
        return ApplyResult(self.current, [], drift)


class CompositeActuator:
    """Several routing layers at once (two sites: the HAProxy weights and the DNS records between
    the site entries): the same plan to each, in order. One that fails does not stop the others:
    its error comes back in `ApplyResult.errors`; only when all fail does `apply` raise.

    The first part is the source of the observed state (instance weights, drains, HAProxy's
    health verdict, site weights), read at every `observe`. The others read their own state back
    in every `apply` (and reconcile their drift there); `observe` shows what they showed then
    (`Observed.layers`, `Observed.errors`), reading them only before their first apply: a slow
    DNS API does not delay the tick's decision, and each tick reads it once, not twice."""

    def __init__(self, parts: list[WeightActuator]):
        if not parts:
            raise ActuatorError("CompositeActuator needs at least one actuator")
        self.parts = list(parts)
        self.names = [p.name for p in self.parts]
        self.name = "+".join(self.names)
        self.seen: dict[str, Observed] = {}    # the others: as read by their last observe or apply
        self.errors: dict[str, str] = {}       # the others: why that read failed

    def set_instances(self, instances) -> None:
        for p in self.parts:
            p.set_instances(instances)

    def observe(self) -> Observed:
        first = self.parts[0].observe()   # no source of truth without it: raise
        for p in self.parts[1:]:
            if p.name in self.seen or p.name in self.errors:
                continue
            try:
                self.seen[p.name] = p.observe()
            except ActuatorError as e:
                self.errors[p.name] = str(e)
        layers = {self.parts[0].name: first.site_weights}
        servers = list(first.servers)
        for p in self.parts[1:]:
            if p.name in self.seen and p.name not in self.errors:
                layers[p.name] = self.seen[p.name].site_weights
                servers += self.seen[p.name].servers
        return replace(first, servers=servers, layers=layers, errors=dict(self.errors))

    def apply(self, plan: Plan) -> ApplyResult:
        results: dict[str, ApplyResult] = {}
        errors: dict[str, str] = {}
        for p in self.parts:
            try:
                results[p.name] = p.apply(plan)
            except ActuatorError as e:
                errors[p.name] = str(e)
                log.error("apply on %s failed (the other actuators still apply): %s", p.name, e)
        for p in self.parts[1:]:
            if p.name in results:
                self.seen[p.name] = results[p.name].observed
                self.errors.pop(p.name, None)
            else:
                self.errors[p.name] = errors[p.name]
        if not results:
            raise ActuatorError("; ".join(f"{n}: {e}" for n, e in errors.items()), by_actuator=errors)
        first = results.get(self.parts[0].name)
        observed = replace(first.observed) if first is not None else Observed()
        observed.servers = [s for r in results.values() for s in r.observed.servers]
        observed.layers = {n: r.observed.site_weights for n, r in results.items()}
        observed.errors = dict(errors)
        return ApplyResult(observed,
                           [f"{n}: {c}" for n, r in results.items() for c in r.commands],
                           [f"{n}: {d}" for n, r in results.items() for d in r.drift], errors)


def actuator_names(actuator: WeightActuator) -> list[str]:
    """The actuators behind one (a CompositeActuator's parts): the labels of apply errors."""
    return list(actuator.names) if isinstance(actuator, CompositeActuator) else [actuator.name]


def _make_one(kind: str, settings, generation: Callable[[], int]) -> WeightActuator:
    if kind == "haproxy":
        # Backend names and socket come from the config generator: one source for both sides.
        return HAProxyActuator(HAProxyRuntime.for_settings(settings), settings.instances,
                               list(haproxy_config.ALL_BACKENDS), list(haproxy_config.SENSITIVE_BACKENDS))
    if kind == "route53":
        from control.adapters.route53 import Route53Actuator  # noqa: PLC0415 - boto3 only when used
        return Route53Actuator.from_settings(settings)
    if kind == "entries":
        from control.traffic.entries import EntriesActuator  # noqa: PLC0415 - boto3 only when used
        return EntriesActuator.from_settings(settings, generation)
    return DryRunActuator(settings.instances)


def make_actuator(settings, generation: Callable[[], int] = lambda: 0) -> WeightActuator:
    """`control.actuators`: one actuator, or a CompositeActuator over several. `generation`: the
    leader's fencing token for actuators that write shared state (`entries`: traffic.json in S3)."""
    parts = [_make_one(kind, settings, generation) for kind in settings.control.actuators]
    return parts[0] if len(parts) == 1 else CompositeActuator(parts)
