"""Sync onto a real Triton (the nvidia-pytriton binary) from a real S3 endpoint (moto's server):
pull + verify + candidate smoke + live; rollback; a tampered object, a broken version and an
escaping key are refused while the previous version keeps serving; S3 down: keep serving, back
off; a restart resumes from the state database. Client load runs against Triton throughout and
must see zero failed requests."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import requests
from botocore.response import StreamingBody
from click.testing import CliRunner
from pydantic import SecretStr

from control.adapters import s3 as s3x
from control.cli import cli
from control.drills.models import write_add_model, write_ensemble
from control.local import stack
from control.local.admin_keys import admin_key
from control.local.isolated import isolated_settings as make_settings
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_instance
from control.mirror.manifest import MANIFEST_NAME, build_manifest
from control.mirror.publish import publish_repository, publish_version
from control.mirror.state import MirrorState
from control.mirror.sync import (
    lag_report,
    live_config_version,
    prepare_instance_repository,
    repository_path,
    rollback,
    sync_all,
)


class Load:
    """Steady client load on one model (no version pinned, like the search front end)."""
    def __init__(self, url: str, model: str = "add_one", threads: int = 2, inp: str = "INPUT0", out: str = "OUTPUT0"):
        self.url, self.model, self.inp, self.out = url, model, inp, out
        self.failures: list[str] = []
        self.seen: dict[float, int] = {}
        self.ok = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        s = requests.Session()
        body = {"inputs": [{"name": self.inp, "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
        while not self._stop.is_set():
            try:
                r = s.post(f"{self.url}/v2/models/{self.model}/infer", json=body, timeout=10)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                v = r.json()["outputs"][0]["data"][0]
                self.seen[v] = self.seen.get(v, 0) + 1
                self.ok += 1
            except requests.RequestException as e:
                self.failures.append(repr(e))

    def __enter__(self):
        [t.start() for t in self._threads]
        return self

    def __exit__(self, *exc):
        self._stop.set()
        [t.join(timeout=15) for t in self._threads]


def vs(out: dict) -> list[tuple]:
    """(version, status) of the models a sync acted on."""
    return [(o["version"], o["status"]) for o in out.values() if o["status"] != "unchanged"]


def first(out: dict) -> dict:
    return next(iter(out.values()))


def infer(inst, model="add_one", inp="INPUT0") -> float:
    r = requests.post(f"{inst.http_url}/v2/models/{model}/infer", timeout=10,
                      json={"inputs": [{"name": inp, "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]})
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"][0]


@pytest.fixture
def env(settings_factory, tmp_path):
    """moto + one Triton started on a repository prepared from S3 (like `triton-hybrid up`)."""
    settings = settings_factory(instances=(("onprem-1", "onprem", 100, True),),
                                s3={"retry_attempts": 2, "retry_base_delay_s": 5.0, "keep_versions": 3})
    inst = settings.instance("onprem-1")
    repo = tmp_path / "repo"
    write_add_model(repo, 1, 1.0)
    s3proc = start_s3_server(settings)
    procs = {"s3": s3proc}
    try:
        client = s3x.make_client(settings.s3)
        publish_repository(settings, repo, progress=False, client=client)
        path = prepare_instance_repository(settings, inst)
        procs["triton"] = start_instance(settings, inst, path, ready_timeout=120)
        yield settings, inst, client, repo, procs
    finally:
        for p in procs.values():
            p.stop()


def rows(settings, inst, model="add_one"):
    st = MirrorState.for_settings(settings)
    try:
        return {r["version"]: r for r in st.rows(inst.name, model)}
    finally:
        st.close()


def test_prepare_then_start_then_sync_goes_live_and_is_idempotent(env):
    settings, inst, client, repo, _ = env
    path = repository_path(settings, inst)
    assert (path / "add_one" / "1" / "model.py").exists()
    assert live_config_version(settings, inst, "add_one") == 1
    out = sync_all(settings)["onprem-1"]
    assert [(o["model"], o["version"], o["status"]) for o in out.values()] == [("add_one", 1, "live")]
    assert (out["add_one"]["live"], out["add_one"]["published"]) == (1, 1)
    json.dumps(out)  # the daemon keeps it for its JSON API
    assert rows(settings, inst)[1]["status"] == "live"
    again = sync_all(settings)["onprem-1"]
    assert vs(again) == [(1, "up-to-date")]
    assert infer(inst) == 1.0


def test_publish_sync_rollback_under_load_zero_failures(env):
    settings, inst, client, repo, _ = env
    sync_all(settings)
    timings = {}
    with Load(inst.http_url) as load:
        time.sleep(0.5)
        write_add_model(repo, 2, 2.0)
        t0 = time.monotonic()
        publish_version(settings, repo, "add_one", client=client)
        out = sync_all(settings)["onprem-1"]
        timings["publish->live"] = time.monotonic() - t0
        assert vs(out) == [(2, "live")], out
        time.sleep(0.5)
        assert infer(inst) == 2.0
        res = rollback(settings, "add_one")
        assert res["to"] == 1 and res["from"] == 2
        assert infer(inst) == 1.0
        # The scheduled sync does not roll forward to the rejected v2 again ...
        assert vs(sync_all(settings)["onprem-1"]) == [(1, "up-to-date")]
        # ... but a newly published version goes live.
        write_add_model(repo, 3, 3.0)
        publish_version(settings, repo, "add_one", client=client)
        assert vs(sync_all(settings)["onprem-1"]) == [(3, "live")]
        time.sleep(0.5)
    assert load.failures == [], load.failures[:5]
    assert set(load.seen) == {1.0, 2.0, 3.0} and load.ok > 50
    r = rows(settings, inst)
    assert (r[1]["status"], r[2]["status"], r[3]["status"]) == ("pulled", "pulled", "live")
    print(f"\npublish->live (small model, one instance): {timings['publish->live']:.2f}s; "
          f"{load.ok} requests, 0 failed")


def tamper_v2(env, change) -> tuple[str, int]:
    """v1 live; v2 published, then its model.py replaced in S3 by change(body), metadata kept (an
    attacker who keeps the recorded sha256). Returns (key, size the manifest records)."""
    settings, _, client, repo, _ = env
    sync_all(settings)
    write_add_model(repo, 2, 2.0)
    publish_version(settings, repo, "add_one", client=client)
    key = s3x.object_key(settings.s3, "add_one", 2, "model.py")
    h = client.head_object(Bucket=settings.s3.bucket, Key=key)
    body = change(client.get_object(Bucket=settings.s3.bucket, Key=key)["Body"].read())
    client.put_object(Bucket=settings.s3.bucket, Key=key, Body=body, Metadata=h["Metadata"],
                      ServerSideEncryption="AES256")
    return key, h["ContentLength"]


def test_tampered_object_is_refused_and_previous_keeps_serving(env):
    settings, inst, client, repo, _ = env
    # same size: only the sha256 can tell
    key, _ = tamper_v2(env, lambda body: body.replace(b"ADD = 2.0", b"ADD = 6.0"))
    with Load(inst.http_url) as load:
        out = sync_all(settings)["onprem-1"]
    assert vs(out) == [(2, "failed")]
    assert "checksum mismatch" in first(out)["reason"] and key in first(out)["reason"]
    assert load.failures == [] and set(load.seen) == {1.0}
    assert infer(inst) == 1.0
    assert not (repository_path(settings, inst) / "add_one" / "2").exists()
    r = rows(settings, inst)
    assert r[2]["status"] == "failed" and r[2]["failure_kind"] == "verify" and r[1]["status"] == "live"
    # Not retried on every tick; the live version stays.
    assert vs(sync_all(settings)["onprem-1"]) == [(1, "up-to-date")]


def test_broken_version_fails_its_smoke_check_unseen_by_clients(env):
    settings, inst, client, repo, _ = env
    sync_all(settings)
    write_add_model(repo, 2, 2.0, fail=True)
    publish_version(settings, repo, "add_one", client=client)
    with Load(inst.http_url) as load:
        out = sync_all(settings)["onprem-1"]
    assert vs(out) == [(2, "failed")]
    assert "smoke" in first(out)["reason"] and "broken on purpose" in first(out)["reason"]
    assert load.failures == [] and set(load.seen) == {1.0}
    assert rows(settings, inst)[2]["failure_kind"] == "smoke"
    idx = requests.post(f"{inst.http_url}/v2/repository/index", json={"ready": True}, timeout=5,
                        headers={"admin-key": admin_key(settings, inst)}).json()
    assert [(m["name"], m["version"]) for m in idx] == [("add_one", "1")]


def test_manifest_with_escaping_key_is_refused(env, tmp_path):
    settings, inst, client, repo, _ = env
    sync_all(settings)
    write_add_model(repo, 2, 2.0)
    m = build_manifest(repo / "add_one", 2)
    data = json.loads(m.to_json())
    data["files"].append({"path": "../../../../escaped.py", "scope": "version", "sha256": "0" * 64, "size": 1})
    data.pop("content_sha256")
    bucket = settings.s3.bucket
    for f in m.files:
        src = repo / "add_one" / ("" if f.scope == "model" else "2") / f.path
        client.put_object(Bucket=bucket, Key=s3x.object_key(settings.s3, "add_one", 2, f.path), Body=src.read_bytes())
    client.put_object(Bucket=bucket, Key=s3x.version_prefix(settings.s3, "add_one", 2) + MANIFEST_NAME,
                      Body=json.dumps(data).encode())
    out = sync_all(settings)["onprem-1"]
    assert vs(out) == [(2, "failed")]
    assert "escape" in first(out)["reason"]
    assert not list(settings.run_path.rglob("escaped.py"))
    assert infer(inst) == 1.0


def test_s3_unreachable_keeps_serving_backs_off_and_reports_lag(env):
    settings, inst, client, repo, procs = env
    sync_all(settings)
    write_add_model(repo, 2, 2.0)
    publish_version(settings, repo, "add_one", client=client)
    procs["s3"].stop()
    out = sync_all(settings)["onprem-1"]
    assert first(out)["status"] == "skipped" and "did not answer" in first(out)["reason"]
    again = sync_all(settings)["onprem-1"]
    assert first(again)["status"] == "skipped" and "backing off" in first(again)["reason"]
    assert infer(inst) == 1.0
    lag = {(r["instance"], r["model"]): r for r in lag_report(settings)}
    assert lag[("onprem-1", "add_one")]["live"] == 1 and lag[("onprem-1", "add_one")]["lag_versions"] == 1
    assert "did not answer" in lag[("onprem-1", "add_one")]["last_sync_error"]


def test_restart_resumes_without_pulling_again(env, s3_calls):
    settings, inst, client, repo, procs = env
    sync_all(settings)
    write_add_model(repo, 2, 2.0)
    publish_version(settings, repo, "add_one", client=client)
    assert vs(sync_all(settings)["onprem-1"]) == [(2, "live")]
    procs.pop("triton").stop()
    count = s3_calls(client)
    path = prepare_instance_repository(settings, inst, client=client)
    assert count["GetObject"] == 2  # the two manifests; no file is downloaded again
    procs["triton"] = start_instance(settings, inst, path, ready_timeout=120)
    assert infer(inst) == 2.0
    assert vs(sync_all(settings)["onprem-1"]) == [(2, "up-to-date")]


def test_ensemble_with_placeholder_goes_live(env):
    settings, inst, client, repo, procs = env
    write_ensemble(repo)
    publish_repository(settings, repo, progress=False, client=client)
    out = sync_all(settings)["onprem-1"]
    assert [(o["model"], o["status"]) for o in out.values()] == [("add_one", "live"), ("pipeline", "live")], out
    assert (repository_path(settings, inst) / "pipeline" / "1" / ".placeholder").exists()
    assert infer(inst, "pipeline", "IN") == 1.0


# The whole stack: real ensemble, two Tritons behind HAProxy ------------------------------------

class EnsembleLoad(Load):
    """search_ranking requests through HAProxy (HTTP), like the search front end."""
    def __init__(self, url: str, query: str, candidates: list[int], threads: int = 2):
        super().__init__(url, "search_ranking", threads)
        self.query, self.candidates = query, candidates

    def _run(self):
        import tritonclient.http as th  # noqa: PLC0415 - deferred: pulls in tritonclient, gevent

        from control.local.demo import ensemble_inputs  # noqa: PLC0415 - deferred: pulls in tritonclient, gevent, grpc

        c = th.InferenceServerClient(self.url.split("://", 1)[-1], network_timeout=30)
        while not self._stop.is_set():
            try:
                r = c.infer("search_ranking", ensemble_inputs(th, self.query, self.candidates, 5))
                if r.as_numpy("TOP_IDS") is None:
                    self.failures.append("no TOP_IDS")
                else:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.failures.append(f"{type(e).__name__}: {e}"[:300])
        c.close()


@pytest.mark.slow
def test_full_stack_publish_sync_rollback_through_haproxy_zero_failures(tmp_path_factory, cpu_repository, tiny_export):

    from model_repository.build import build_repository  # noqa: PLC0415 - deferred: pulls in tritonclient, grpc

    repo = tmp_path_factory.mktemp("mirror_repo") / "cpu"
    shutil.copytree(cpu_repository, repo)
    settings = make_settings(tmp_path_factory.mktemp("mirror_stack") / "run", models={"repository_dir": str(repo)},
                             control={"start_daemon": False})
    q = json.loads((tiny_export / "heldout_queries.json").read_text())[0]
    st = stack.up(settings)
    figures = {}
    try:
        first = sync_all(settings)
        v1 = {m: d["live"] for m, d in first["onprem-1"].items()}
        # `up` smoke-tested and marked every model live before HAProxy started: nothing to do.
        bad = [(d["instance"], m, d["status"], d["reason"]) for inst in first.values() for m, d in inst.items()
               if d["status"] != "up-to-date"]
        assert bad == [], bad
        built = build_repository(tiny_export, repo, "cpu")  # the next version of every model
        v2 = built.versions
        h = settings.haproxy
        with EnsembleLoad(f"http://{h.host}:{h.http_port}", q["query"], q["candidate_ids"]) as load:
            time.sleep(1)
            t0 = time.monotonic()
            publish_version(settings, repo, "query_intent")
            out = sync_all(settings, models=["query_intent"])
            figures["small (query_intent, 2 instances)"] = time.monotonic() - t0
            assert all(inst["query_intent"]["live"] == v2["query_intent"] for inst in out.values()), out
            t0 = time.monotonic()
            publish_repository(settings, repo, progress=False)
            out = sync_all(settings)
            figures["full repository (3 models, 2 instances)"] = time.monotonic() - t0
            for name, inst in out.items():
                assert {m: d["live"] for m, d in inst.items()} == v2, (name, inst)
            t0 = time.monotonic()
            for model in ("search_ranking", "ranker"):
                res = rollback(settings, model)
                assert res["to"] == v1[model]
            figures["rollback (ranker + search_ranking, 2 instances)"] = time.monotonic() - t0
            time.sleep(1)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 20
        state = MirrorState.for_settings(settings)
        for inst in settings.instances:
            assert state.live_version(inst.name, "ranker") == v1["ranker"]
            assert state.live_version(inst.name, "query_intent") == v2["query_intent"]
        state.close()
        print(f"\nthrough HAProxy: {load.ok} search_ranking requests, 0 failed; publish->live: "
              + "; ".join(f"{k} {v:.1f}s" for k, v in figures.items()))
    finally:
        st.stop()
        stack.down(settings)


def test_cli_sync_versions_rollback(env):

    settings, inst, client, repo, _ = env
    run = lambda *a: CliRunner().invoke(cli, ["--config", settings.source, *a], catch_exceptions=False)  # noqa: E731
    r = run("sync", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["onprem-1"]["add_one"]["live"] == 1
    r = run("rollback", "add_one")
    assert r.exit_code != 0 and "no published version older than the live v1" in r.output
    write_add_model(repo, 2, 2.0)
    r = run("publish", "add_one", "--repo", str(repo), "--json")
    assert r.exit_code == 0 and json.loads(r.output)[0]["uploaded_files"] == 1, r.output
    r = run("versions", "--json")
    data = json.loads(r.output)
    assert [(p["model"], p["version"]) for p in data["published"]] == [("add_one", 1), ("add_one", 2)]
    assert data["lag"][0]["lag_versions"] == 1
    assert run("sync").exit_code == 0
    r = run("rollback", "add_one", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["to"] == 1, r.output
    assert run("versions").exit_code == 0
    rejected = json.loads(run("versions", "--json").output)["rejected"]
    assert rejected == [{"model": "add_one", "version": 2, "reason": "rolled back to v1 by the operator"}]
    assert run("sync", "--instance", "nope").exit_code != 0


def test_host_retention_keeps_newest_and_live_and_wrong_admin_key_is_reported(env):
    settings, inst, client, repo, _ = env
    sync_all(settings)
    for v in (2, 3, 4):
        write_add_model(repo, v, float(v))
        publish_version(settings, repo, "add_one", client=client)
        assert vs(sync_all(settings)["onprem-1"]) == [(v, "live")]
    versions_on_disk = lambda: sorted(int(p.name) for p in (repository_path(settings, inst) / "add_one").iterdir()  # noqa: E731
                                      if p.name.isdigit())
    assert versions_on_disk() == [2, 3, 4]  # the newest 3
    assert rows(settings, inst)[1]["status"] == "retired"
    rollback(settings, "add_one", to=2)  # from the host copy, verified again
    write_add_model(repo, 5, 5.0)
    publish_version(settings, repo, "add_one", client=client)
    assert vs(sync_all(settings)["onprem-1"]) == [(5, "live")]
    assert versions_on_disk() == [3, 4, 5]
    assert rows(settings, inst)[2]["status"] == "retired"
    # A wrong admin key: recorded with Triton's answer, nothing crashes, the model keeps serving.
    bad = settings.model_copy(update={"triton": settings.triton.model_copy(update={"admin_keys": {inst.name: SecretStr("wrong")}})})
    out = sync_all(bad, force=True)["onprem-1"]
    assert first(out)["status"] == "skipped" and "repository index refused" in first(out)["reason"]
    assert infer(inst) == 5.0


def test_overlapping_scheduled_sync_is_skipped_not_queued(settings_factory):
    from control.mirror.sync import instance_lock, sync_instance  # noqa: PLC0415 - deferred: pulls in boto3, botocore, tritonclient

    settings = settings_factory(instances=(("onprem-1", "onprem", 100, True),))
    inst = settings.instance("onprem-1")
    with instance_lock(settings, inst) as got:
        assert got
        out = sync_instance(settings, inst, force=False)
    assert [(o.status, o.reason) for o in out] == [("skipped", "another sync of this instance is running")]


@pytest.mark.parametrize("stray", ["add_one/abc/x", "add_one/\u00b2/junk", "add_one/07/x", "add_one/\u0661/x"])
def test_stray_key_in_the_mirror_is_ignored_with_a_warning_and_blocks_nothing(env, stray, caplog):
    """Issue 15 finding 5: `ranker/²/junk` (str.isdigit() accepts '²', int() does not) made every sync
    of every model fail until deleted."""
    settings, inst, client, repo, _ = env
    sync_all(settings)
    client.put_object(Bucket=settings.s3.bucket, Key=f"{settings.s3.prefix}/{stray}", Body=b"junk",
                      ServerSideEncryption="AES256")
    write_add_model(repo, 2, 2.0)
    publish_version(settings, repo, "add_one", client=client)
    with caplog.at_level("WARNING", logger="triton_hybrid.mirror"):
        out = sync_all(settings)["onprem-1"]
    assert vs(out) == [(2, "live")]
    assert infer(inst) == 2.0
    name = stray.split("/")[1]
    assert any("not a version" in r.getMessage() and f"/add_one/{name}/" in r.getMessage() for r in caplog.records)


def test_oversized_object_is_refused_without_reading_it_whole(env, monkeypatch):
    """Issue 15 finding 6: a file the manifest says is small was downloaded whole (~275 MB) before the
    size check. Now no more than manifest size + 1 byte is read."""
    settings, inst, client, repo, _ = env
    key, small = tamper_v2(env, lambda body: body + b"#" * (8 * 1024 * 1024))
    read: dict[int, int] = {}  # bytes read per object body
    orig = StreamingBody.iter_chunks

    def counting(self, chunk_size=1024):
        for chunk in orig(self, chunk_size):
            read[id(self)] = read.get(id(self), 0) + len(chunk)
            yield chunk
    monkeypatch.setattr(StreamingBody, "iter_chunks", counting)
    out = sync_all(settings)["onprem-1"]
    assert vs(out) == [(2, "failed")]
    assert f"larger than the {small} bytes" in first(out)["reason"] and key in first(out)["reason"]
    assert max(read.values()) <= small + 1, f"read {max(read.values())} bytes of an object the manifest says has {small}"
    assert infer(inst) == 1.0
    assert not (repository_path(settings, inst) / "add_one" / "2").exists()
