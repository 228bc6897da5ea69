"""The agent's decision per model (control/agent/converge.py `decide`, `plan`): a pure function of the
desired targets, what is on disk, what Triton has READY, the versions that failed here and whether
the live version was smoke-checked since the agent started. No server."""
from __future__ import annotations

import pytest

from control.agent.converge import (
    Action,
    ModelPhase,
    ModelReport,
    ModelView,
    PassResult,
    Reason,
    decide,
    plan,
)
from control.agent.main import AgentSetupError, read_secret
from control.agent.pull import Throttle
from control.local.admin_keys import admin_key, ensure_agent_token
from control.local.agents import agent_config_for
from control.mirror.desired import Canary, DesiredState, ModelState, Rejection


def view(**kw) -> ModelView:
    base = dict(model="ranker", target=2)
    base.update({k: frozenset(v) if isinstance(v, set) else v for k, v in kw.items()})
    return ModelView(**base)


@pytest.mark.parametrize("kw, up, action, reason, previous", [
    # An empty host: roll (pull, candidate, go live); nothing serves meanwhile.
    (dict(), True, Action.ROLL, Reason.NEW_TARGET, None),
    # v1 live, v2 desired: roll, v1 keeps serving on failure.
    (dict(on_disk={1}, live_config=1, ready={1}, verified=True), True, Action.ROLL, Reason.NEW_TARGET, 1),
    # Already pulled but not live yet: still a roll (candidate check first).
    (dict(on_disk={1, 2}, live_config=1, ready={1}), True, Action.ROLL, Reason.NEW_TARGET, 1),
    # Live and checked: nothing to do.
    (dict(on_disk={2}, live_config=2, ready={2}, verified=True), True, Action.KEEP, Reason.LIVE, 2),
    # Live (e.g. loaded by Triton at start from a prepared repository) but not checked by this agent: smoke it.
    (dict(on_disk={2}, live_config=2, ready={2}), True, Action.VERIFY, Reason.NOT_VERIFIED, 2),
    # The config names it, it is on disk, Triton has not loaded it (Triton restarted): load.
    (dict(on_disk={2}, live_config=2, ready=set()), True, Action.LOAD, Reason.NOT_LOADED, None),
    # The config names it but its files are gone: pull again.
    (dict(on_disk={1}, live_config=2, ready=set()), True, Action.ROLL, Reason.MISSING_ON_DISK, None),
    # Rejected in the desired state: never loaded, whatever serves keeps serving (defense in depth).
    (dict(rejected={2}, on_disk={1}, live_config=1, ready={1}), True, Action.REFUSE, Reason.REJECTED, 1),
    (dict(rejected={2}, on_disk={2}, live_config=2, ready={2}, verified=True), True, Action.REFUSE, Reason.REJECTED, 2),
    # Failed on this host before: not retried (versions are immutable).
    (dict(failed={2}, on_disk={1}, live_config=1, ready={1}), True, Action.REFUSE, Reason.FAILED_HERE, 1),
    # Rejected wins over everything, also with Triton down.
    (dict(rejected={2}), False, Action.REFUSE, Reason.REJECTED, None),
    # Triton not answering: an empty host prepares (init container) ...
    (dict(), False, Action.PREPARE, Reason.TRITON_DOWN, None),
    # ... a prepared host is done ...
    (dict(on_disk={2}, live_config=2), False, Action.KEEP, Reason.PREPARED, None),
    # ... a host whose live config names the target but holds no copy this agent verified (written
    # by an older release) prepares it again: the verified pull replaces the directory ...
    (dict(live_config=2), False, Action.PREPARE, Reason.TRITON_DOWN, None),
    # ... and a host with another version live waits: no config switch without a candidate check.
    (dict(on_disk={1}, live_config=1), False, Action.WAIT, Reason.TRITON_DOWN, None),
])
def test_decide(kw, up, action, reason, previous):
    d = decide(view(**kw), triton_up=up)
    assert (d.action, d.reason, d.previous) == (action, reason, previous)


def test_previous_is_only_what_triton_serves():
    # The config names v1 but Triton does not have it READY: nothing serves, so nothing to keep on failure.
    assert decide(view(on_disk={1}, live_config=1, ready=set()), True).previous is None
    # Triton has v1 READY but the config names nothing we know: nothing we serve either.
    assert decide(view(ready={1}), True).previous is None


def test_plan_uses_the_canary_and_skips_untargeted_models():
    desired = DesiredState(models={
        "ranker": ModelState(stable=1, canary=Canary(version=2, instances=["onprem-1"])),
        "query_intent": ModelState(stable=3, rejected={3: Rejection(reason="bad", at=0)}),
        "unset": ModelState(),
    })
    ds = plan(desired, "onprem-1", failed={}, on_disk={"ranker": {1}}, live_config={"ranker": 1},
              ready={"ranker": {1}}, verified={("ranker", 1)}, triton_up=True)
    assert [(d.model, d.target, d.action) for d in ds] == [("query_intent", 3, Action.REFUSE),
                                                          ("ranker", 2, Action.ROLL)]
    other = plan(desired, "cloud-1", failed={}, on_disk={"ranker": {1}}, live_config={"ranker": 1},
                 ready={"ranker": {1}}, verified={("ranker", 1)}, triton_up=True)
    assert [(d.model, d.target, d.action) for d in other] == [("query_intent", 3, Action.REFUSE),
                                                             ("ranker", 1, Action.KEEP)]


def test_verified_is_per_version():
    desired = DesiredState(models={"ranker": ModelState(stable=2)})
    ds = plan(desired, "h", failed={}, on_disk={"ranker": {2}}, live_config={"ranker": 2}, ready={"ranker": {2}},
              verified={("ranker", 1)}, triton_up=True)
    assert ds[0].action == Action.VERIFY


def _rep(state, live, desired=2):
    return ModelReport("m", desired, live, state, Action.KEEP)


def test_converged_and_prepared():
    assert PassResult(True).converged  # nothing desired: nothing to wait for
    assert PassResult(True, {"m": _rep(ModelPhase.LIVE, 2)}).converged
    assert not PassResult(True, {"m": _rep(ModelPhase.LIVE, 1)}).converged
    assert not PassResult(True, {"m": _rep(ModelPhase.FAILED, 1)}).converged
    assert not PassResult(True, {"m": _rep(ModelPhase.REFUSED, 1)}).converged
    prepared = PassResult(False, {"m": _rep(ModelPhase.PREPARED, None)})
    assert prepared.prepared and not prepared.converged
    assert not PassResult(False, {"m": _rep(ModelPhase.WAITING, None)}).prepared


def test_throttle_keeps_the_rate():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s
    t = Throttle(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        t.take(500)
    assert now[0] == pytest.approx(5.0)  # 5000 bytes at 1000 B/s
    assert Throttle(None).take(10**9) is None


def test_report_is_json_ready():
    d = ModelReport("m", 2, 1, ModelPhase.FAILED, Action.ROLL, "new-target", "bad answer", "smoke", 0.5).as_dict()
    # The keys the rollout reads (docs/rollout.md "What the agent must report"): live, target, state, error.
    assert d == {"model": "m", "target": 2, "live": 1, "state": "failed", "action": "roll", "reason": "new-target",
                 "error": "bad answer", "kind": "smoke", "seconds": 0.5}
    assert isinstance(d["state"], str) and type(d["state"]) is str


def test_agent_config_for_an_instance_of_the_registry(settings_factory):

    settings = settings_factory()
    inst = settings.instance("cloud-1")
    cfg = agent_config_for(settings, inst, api_port=9999)
    assert (cfg.instance, cfg.site, cfg.triton_url, cfg.api_port) == ("cloud-1", "cloud", inst.http_url, 9999)
    assert cfg.repository_dir == str(settings.run_path / "instances" / "cloud-1" / "repository")
    assert cfg.state_path == settings.run_path / "instances" / "cloud-1" / "agent"
    # Secrets by file (0600), not inline: the agent's config file then holds none.
    assert read_secret(cfg.admin_key, cfg.admin_key_file, "agent.admin_key") == admin_key(settings, inst)
    assert read_secret(cfg.token, cfg.token_file, "agent.token") == ensure_agent_token(settings, inst)
    assert not cfg.admin_key.get_secret_value() and not cfg.token.get_secret_value()
    assert (cfg.api_port, cfg.advertise_agent_url) == (9999, inst.agent_url)


def test_secret_files_may_be_group_readable_as_kubernetes_mounts_them_but_never_open_to_others(tmp_path):
    from pydantic import SecretStr  # noqa: PLC0415

    f = tmp_path / "token"
    f.write_text("s3cret\n")
    for mode in (0o600, 0o400, 0o440):  # 0440: a Secret volume with fsGroup (kubernetes#57923)
        f.chmod(mode)
        assert read_secret(SecretStr(""), str(f), "agent.token") == "s3cret"
    for mode in (0o644, 0o604, 0o660):
        f.chmod(mode)
        with pytest.raises(AgentSetupError, match=r"open to others .*chmod 600"):
            read_secret(SecretStr(""), str(f), "agent.token")
    with pytest.raises(AgentSetupError, match="does not exist"):
        read_secret(SecretStr(""), str(tmp_path / "missing"), "agent.token")
