"""Desired state in the S3 mirror (control/mirror/desired.py) against a real S3 endpoint (moto's
server): conditional writes decide every race, a damaged or stray object is refused with its key
named, an older leader generation cannot overwrite a newer one."""
from __future__ import annotations

import hashlib
import threading

import pytest

from control.adapters import s3 as s3x
from control.local.s3_endpoint import start_s3_server
from control.mirror.desired import (
    Canary,
    DesiredState,
    DesiredStateError,
    DesiredStore,
    InstanceStatus,
    ModelState,
    control_key,
    reject,
)


@pytest.fixture
def store(settings_factory):
    settings = settings_factory()
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        yield DesiredStore(client, settings.s3)
    finally:
        proc.stop()


def set_stable(model, v):
    def change(s: DesiredState) -> DesiredState:
        s.models.setdefault(model, ModelState()).stable = v
        return s
    return change


def test_absent_then_created_then_updated_with_revisions(store):
    r = store.read()
    assert r.etag is None and r.state.models == {}
    s1 = store.update(set_stable("ranker", 1), by="t", clock=lambda: 100.0)
    assert (s1.revision, s1.updated_at, s1.updated_by) == (1, 100.0, "t")
    s2 = store.update(set_stable("ranker", 2), by="t")
    assert s2.revision == 2 and store.read().state.models["ranker"].stable == 2
    assert store.update(lambda s: None, by="t").revision == 2  # nothing to do: no write


def test_a_stale_etag_loses_and_nothing_is_overwritten(store):
    store.update(set_stable("ranker", 1), by="a")
    stale = store.read()
    store.update(set_stable("ranker", 2), by="b")
    with pytest.raises(s3x.PreconditionFailed):
        store.write(stale.state.model_copy(update={"models": {"ranker": ModelState(stable=9)}}), stale.etag)
    assert store.read().state.models["ranker"].stable == 2
    with pytest.raises(s3x.PreconditionFailed):  # create-only when we believe it absent
        store.write(DesiredState(), None)


def test_concurrent_writers_each_change_lands_exactly_once(store):
    """Eight writers each add their own rejected version at once: all eight land (re-read, re-decide)."""
    store.update(set_stable("ranker", 1), by="setup")
    errors = []

    def writer(v):
        try:
            store.update(reject("ranker", v, f"bad {v}", by=f"w{v}", now=1.0), by=f"w{v}", attempts=20)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(v,)) for v in range(2, 10)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    st = store.read().state
    assert sorted(st.models["ranker"].rejected) == list(range(2, 10))
    assert st.revision == 1 + 8


def test_targets_follow_the_canary(store):
    st = DesiredState(models={"ranker": ModelState(stable=1, canary=Canary(version=2, instances=["onprem-1"])),
                              "query_intent": ModelState(stable=3), "new": ModelState()})
    assert st.targets("onprem-1") == {"query_intent": 3, "ranker": 2}
    assert st.targets("cloud-1") == {"query_intent": 3, "ranker": 1}
    ended = reject("ranker", 2, "p99 regressed", by="rollout", now=5.0)(st)
    assert ended.models["ranker"].canary is None and ended.is_rejected("ranker", 2)
    assert ended.models["ranker"].rejected[2].reason == "p99 regressed"


def test_an_older_generation_cannot_write_after_a_newer_one(store):
    store.update(set_stable("ranker", 1), by="leader-1", generation=1)
    store.update(set_stable("ranker", 2), by="leader-2", generation=2)
    with pytest.raises(DesiredStateError, match="generation 2; this writer has 1: a newer leader"):
        store.update(set_stable("ranker", 3), by="leader-1", generation=1)
    assert store.read().state.models["ranker"].stable == 2


@pytest.mark.parametrize("body,meta,match", [
    (b'{"models": {}}', {"sha256": "0" * 64}, "sha256 of the body does not match"),
    (b"not json", None, "not a valid DesiredState"),
    (b'{"models": {"../x": {}}}', None, "not a valid DesiredState"),
    (b'{"schema_version": 99}', None, "schema 99 is newer"),
])
def test_a_damaged_or_foreign_desired_state_is_refused_with_its_key(store, body, meta, match):
    store.client.put_object(Bucket=store.bucket, Key=store.key, Body=body,
                            Metadata=meta or {"sha256": hashlib.sha256(body).hexdigest()})
    with pytest.raises(DesiredStateError, match=match) as e:
        store.read()
    assert store.key in str(e.value)
    with pytest.raises(DesiredStateError):  # and nobody writes over it blindly
        store.update(set_stable("ranker", 1), by="t")


def test_status_objects_round_trip_and_strays_are_named(store):
    store.write_status(InstanceStatus(instance="onprem-1", site="onprem", ready=True, models={"ranker": {"live": 2}}))
    store.write_status(InstanceStatus(instance="cloud-1", site="cloud"))
    stray = control_key(store.s3cfg, "status", "impostor.json")
    body = InstanceStatus(instance="onprem-1", site="cloud").model_dump_json().encode()
    store.client.put_object(Bucket=store.bucket, Key=stray, Body=body, Metadata={"sha256": hashlib.sha256(body).hexdigest()})
    store.client.put_object(Bucket=store.bucket, Key=control_key(store.s3cfg, "status", "junk.json"), Body=b"{")
    got, problems = store.statuses()
    assert set(got) == {"onprem-1", "cloud-1"} and got["onprem-1"].site == "onprem" and got["onprem-1"].ready
    assert any("impostor.json" in p and "holds the status of 'onprem-1'" in p for p in problems)
    assert any("junk.json" in p for p in problems)
