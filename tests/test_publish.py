"""Publishing to a real S3 endpoint (moto's server over HTTP on a free loopback port): manifest
last, SSE on every object, unchanged files not re-sent, exactly one of two publishers wins, an
interrupted publish is invisible and completed by the next one, unsafe keys are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time as _t
from pathlib import Path

import pytest

from control.adapters import s3 as s3x
from control.drills.models import write_add_model, write_ensemble
from control.local.s3_endpoint import start_s3_server
from control.mirror.desired import DesiredStore, InstanceStatus, seed_stable
from control.mirror.manifest import (
    MANIFEST_NAME,
    ManifestError,
    UnsafePathError,
    build_manifest,
    parse_manifest,
    safe_join,
    validate_relpath,
)
from control.mirror.publish import (
    PublishConflict,
    PublishedIndex,
    PublishError,
    publish_repository,
    publish_version,
    published_versions,
    read_manifest,
)

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def s3env(settings_factory, tmp_path):
    """Settings on free ports + a real moto server (the lead's launcher) + a client."""
    settings = settings_factory(s3={"multipart_threshold_mb": 5, "keep_versions": 3})
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        yield settings, client, tmp_path / "repo"
    finally:
        proc.stop()


def all_keys(settings, client, model="add_one"):
    return s3x.list_keys(client, settings.s3.bucket, s3x.model_prefix(settings.s3, model))


# Key validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "a/", "", ".", "a/./b",
                                 "C:/x", "x\x00y"])
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(UnsafePathError):
        validate_relpath(bad)


def test_safe_join_refuses_symlink_escape(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert safe_join(tmp_path / "root", "a/b.txt") == tmp_path / "root" / "a" / "b.txt"
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path / "root", "link/x")


def test_manifest_with_escaping_key_is_refused(tmp_path):
    m = build_manifest(write_add_model(tmp_path, 1, 1.0), 1)
    data = json.loads(m.to_json())
    for bad in ("../../evil.py", "/abs/evil.py", "sub\\evil.py", "a//b"):
        data["files"][0]["path"] = bad
        data.pop("content_sha256", None)
        with pytest.raises(UnsafePathError):
            parse_manifest(json.dumps(data))


def test_ensemble_version_gets_placeholder(tmp_path):
    m = build_manifest(write_ensemble(tmp_path), 1)
    assert [(f.scope, f.path, f.size) for f in m.version_files()] == [("version", ".placeholder", 0)]
    assert any(f.path == "config.pbtxt" and f.scope == "model" for f in m.files)


# Publishing ------------------------------------------------------------------------------------

def test_publish_encrypts_every_object_and_writes_manifest_last(s3env):
    settings, client, repo = s3env
    write_add_model(repo, 1, 1.0, extra={"weights/big.bin": os.urandom(6 * 1024 * 1024)})
    order: list[str] = []
    client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: order.append(params["Key"]))
    client.meta.events.register("provide-client-params.s3.CreateMultipartUpload", lambda params, **_: order.append(params["Key"]))
    r = publish_version(settings, repo, "add_one", client=client)
    assert r.status == "published" and r.uploaded_files == 3 and r.files == 3
    data_keys = [k for k in order if not k.endswith(("_publish.lock",))]
    assert data_keys[-1].endswith(MANIFEST_NAME), order  # the manifest is the last write
    keys = all_keys(settings, client)
    assert sorted(k.rsplit("/1/", 1)[1] for k in keys) == sorted(
        [MANIFEST_NAME, "config.pbtxt", "model.py", "weights/big.bin"])  # lock released
    for k in keys:
        h = client.head_object(Bucket=settings.s3.bucket, Key=k)
        assert h["ServerSideEncryption"] == "AES256", k
    big = client.head_object(Bucket=settings.s3.bucket, Key=s3x.object_key(settings.s3, "add_one", 1, "weights/big.bin"))
    assert "-" in big["ETag"], "a file above the threshold goes multipart"
    assert published_versions(client, settings.s3, "add_one") == [1]
    m = read_manifest(client, settings.s3, "add_one", 1)
    assert m.content_sha256 == r.content_sha256


def test_sse_kms_is_configurable(settings_factory, tmp_path):

    settings = settings_factory(s3={"sse": "aws:kms", "kms_key_id": "alias/models"})
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        write_add_model(tmp_path / "repo", 1, 1.0)
        publish_version(settings, tmp_path / "repo", "add_one", client=client)
        for k in all_keys(settings, client):
            h = client.head_object(Bucket=settings.s3.bucket, Key=k)
            assert h["ServerSideEncryption"] == "aws:kms" and h["SSEKMSKeyId"] == "alias/models", k
    finally:
        proc.stop()


def test_unchanged_files_are_not_uploaded_again(s3env, s3_calls):
    settings, client, repo = s3env
    blob = os.urandom(2 * 1024 * 1024)
    write_add_model(repo, 1, 1.0, extra={"weights.bin": blob})
    count = s3_calls(client)
    first = publish_version(settings, repo, "add_one", client=client)
    assert first.uploaded_files == 3 and first.uploaded_bytes == first.bytes_total
    count.reset()
    again = publish_version(settings, repo, "add_one", client=client)
    assert again.status == "already-published" and again.uploaded_bytes == 0
    assert count["PutObject"] == 0 and count["UploadPart"] == 0
    # Version 2: same weights and config, new model.py -> one upload, two server-side copies.
    write_add_model(repo, 2, 2.0, extra={"weights.bin": blob})
    count.reset()
    second = publish_version(settings, repo, "add_one", client=client)
    assert (second.uploaded_files, second.copied_files) == (1, 2)
    assert second.uploaded_bytes == (repo / "add_one/2/model.py").stat().st_size
    assert count["CopyObject"] == 2
    assert count["PutObject"] == 3  # model.py + lock + manifest
    for k in all_keys(settings, client):
        assert client.head_object(Bucket=settings.s3.bucket, Key=k)["ServerSideEncryption"] == "AES256"


def test_published_version_is_immutable(s3env):
    settings, client, repo = s3env
    write_add_model(repo, 1, 1.0)
    publish_version(settings, repo, "add_one", client=client)
    write_add_model(repo, 1, 5.0)  # same version number, other content
    with pytest.raises(PublishConflict, match="immutable"):
        publish_version(settings, repo, "add_one", client=client)


def race(settings, repos, before=None, **kw) -> tuple[list, list[str]]:
    """Publish add_one v1 from each repo at once (one thread each): (results, conflict messages)."""
    results, errors = [], []

    def run(repo):
        if before:
            before()
        try:
            results.append(publish_version(settings, repo, "add_one", client=s3x.make_client(settings.s3), **kw))
        except PublishConflict as e:
            errors.append(str(e))

    threads = [threading.Thread(target=run, args=(r,)) for r in repos]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results, errors


def test_two_publishers_other_content_one_wins(s3env, tmp_path):
    settings, client, _ = s3env
    repos = [tmp_path / "a", tmp_path / "b"]
    write_add_model(repos[0], 1, 1.0, extra={"w.bin": os.urandom(3 * 1024 * 1024)})
    write_add_model(repos[1], 1, 9.0, extra={"w.bin": os.urandom(3 * 1024 * 1024)})
    barrier = threading.Barrier(2)
    results, errors = race(settings, repos, before=barrier.wait)
    assert len(results) == 1 and len(errors) == 1, (results, errors)
    assert "add_one version 1" in errors[0]
    m = read_manifest(client, settings.s3, "add_one", 1)
    assert m.content_sha256 == results[0].content_sha256


def test_manifest_conditional_write_decides_a_race(s3env, tmp_path, monkeypatch):
    """Both publishers get past the lock (the second breaks it) and upload; the conditional
    manifest write lets exactly one of them publish."""
    import control.mirror.publish as pub  # noqa: PLC0415 - deferred: pulls in boto3, botocore

    settings, client, _ = s3env
    repos = [tmp_path / "a", tmp_path / "b"]
    write_add_model(repos[0], 1, 1.0)
    write_add_model(repos[1], 1, 9.0)
    barrier = threading.Barrier(2)
    real = pub._upload_files

    def upload_then_wait(*a, **kw):
        real(*a, **kw)
        barrier.wait(timeout=30)

    monkeypatch.setattr(pub, "_upload_files", upload_then_wait)
    results, errors = race(settings, repos, break_lock=True)
    assert len(results) == 1 and len(errors) == 1, (results, errors)
    assert "completed" in errors[0] and "first" in errors[0]


def test_interrupted_publish_is_invisible_and_completed_next_time(s3env):
    settings, client, repo = s3env
    extra = {f"part{i}.bin": os.urandom(256 * 1024) for i in range(6)}
    write_add_model(repo, 1, 1.0, extra=extra)
    script = textwrap.dedent(f"""
        import os, signal, sys, json
        sys.path.insert(0, {str(ROOT)!r})
        from control.config import load_config
        from control.adapters import s3 as s3x
        from control.mirror.publish import publish_version
        settings = load_config(environ={{}}, overrides=json.loads(sys.argv[1]))
        client = s3x.make_client(settings.s3)
        n = [0]
        real = client.upload_file
        def upload(*a, **kw):
            real(*a, **kw)
            n[0] += 1
            if n[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)   # killed halfway, no clean-up at all
        client.upload_file = upload
        publish_version(settings, {str(repo)!r}, "add_one", client=client)
    """)
    overrides = {"run_dir": settings.run_dir, "s3": {"port": settings.s3.port}, "instances": []}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(overrides)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    keys = all_keys(settings, client)
    assert not any(k.endswith(MANIFEST_NAME) for k in keys)
    assert any(k.endswith("_publish.lock") for k in keys)
    assert published_versions(client, settings.s3, "add_one") == []  # invisible to sync
    r = publish_version(settings, repo, "add_one", client=client)
    assert r.status == "published" and r.skipped_files == 3 and r.uploaded_files == r.files - 3
    assert published_versions(client, settings.s3, "add_one") == [1]
    assert not any(k.endswith("_publish.lock") for k in all_keys(settings, client))


def test_other_publisher_lock_refuses_with_holder_named(s3env, tmp_path):
    settings, client, repo = s3env
    write_add_model(repo, 1, 1.0)
    client.put_object(Bucket=settings.s3.bucket, Key=s3x.object_key(settings.s3, "add_one", 1, "_publish.lock"),
                      Body=json.dumps({"publisher": "builder-7:123", "started": _t.time(),
                                       "content_sha256": "0" * 64}).encode())
    with pytest.raises(PublishConflict, match="builder-7:123.*--break-lock"):
        publish_version(settings, repo, "add_one", client=client)
    assert publish_version(settings, repo, "add_one", client=client, break_lock=True).status == "published"


def test_publish_repository_publishes_newest_and_is_idempotent(s3env):
    settings, client, repo = s3env
    write_add_model(repo, 1, 1.0)
    write_add_model(repo, 2, 2.0)
    write_ensemble(repo)
    first = publish_repository(settings, repo, progress=False, client=client)
    assert [(r.model, r.version, r.status) for r in first] == [("add_one", 2, "published"), ("pipeline", 1, "published")]
    keys = s3x.list_keys(client, settings.s3.bucket, s3x.model_prefix(settings.s3, "pipeline"))
    assert any(k.endswith("/1/.placeholder") for k in keys)
    again = publish_repository(settings, repo, progress=False, client=client)
    assert [r.status for r in again] == ["already-published", "already-published"]


def test_s3_retention_keeps_newest_and_what_is_in_use(s3env):
    """In use = stable, canary, or live/targeted on an agent, all read from S3 (no control database)."""
    settings, client, repo = s3env
    store = DesiredStore(client, settings.s3)
    for v in (1, 2, 3):
        write_add_model(repo, v, float(v))
        publish_version(settings, repo, "add_one", v, client=client)
    store.update(seed_stable({"add_one": 1}), by="test")
    store.write_status(InstanceStatus(instance="cloud-9", site="cloud", models={"add_one": {"live": 2, "target": 3}}))
    write_add_model(repo, 4, 4.0)
    r = publish_version(settings, repo, "add_one", 4, client=client)
    assert r.retired == []  # v1 is stable, v2 still live on cloud-9

    def stable_v3(s):
        s.models["add_one"].stable = 3
        return s
    store.update(stable_v3, by="test")
    store.write_status(InstanceStatus(instance="cloud-9", site="cloud", models={"add_one": {"live": 3, "target": 3}}))
    write_add_model(repo, 5, 5.0)
    r = publish_version(settings, repo, "add_one", 5, client=client)
    assert sorted(r.retired) == [1, 2]
    assert published_versions(client, settings.s3, "add_one") == [3, 4, 5]
    assert not any("/add_one/1/" in k for k in all_keys(settings, client))


def test_missing_repository_and_model_say_what_to_do(s3env, tmp_path):
    settings, client, repo = s3env
    with pytest.raises(PublishError, match="repo build"):
        publish_repository(settings, tmp_path / "nope", progress=False, client=client)
    repo.mkdir()
    with pytest.raises(PublishError, match="does not exist"):
        publish_version(settings, repo, "add_one", client=client)
    (repo / "bad").mkdir()
    (repo / "bad" / "1").mkdir()
    (repo / "bad" / "1" / "x").write_text("x")
    with pytest.raises(PublishError, match="config.pbtxt is missing"):
        publish_version(settings, repo, "bad", client=client)


def test_unreachable_s3_is_a_clear_error(settings_factory, tmp_path):
    settings = settings_factory(s3={"retry_attempts": 2})
    write_add_model(tmp_path / "repo", 1, 1.0)
    with pytest.raises(s3x.S3Unreachable, match="did not answer"):
        publish_version(settings, tmp_path / "repo", "add_one")


def test_manifest_errors_are_specific():
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{")


def test_tampered_earlier_object_is_uploaded_not_copied(s3env):
    """A published object altered afterwards (same key, its sha256 metadata kept) changes its
    ETag: the next version uploads that file from the local repository instead of copying it."""
    settings, client, repo = s3env
    blob = os.urandom(256 * 1024)
    write_add_model(repo, 1, 1.0, extra={"weights.bin": blob})
    publish_version(settings, repo, "add_one", client=client)
    key = s3x.object_key(settings.s3, "add_one", 1, "weights.bin")
    meta = client.head_object(Bucket=settings.s3.bucket, Key=key)["Metadata"]
    client.put_object(Bucket=settings.s3.bucket, Key=key, Body=b"tampered" + blob[8:], Metadata=meta)
    write_add_model(repo, 2, 2.0, extra={"weights.bin": blob})
    second = publish_version(settings, repo, "add_one", client=client)
    assert second.copied_files == 1  # config.pbtxt, untouched, is still copied
    assert second.uploaded_files == 2  # model.py (changed) and weights.bin (its source was altered)
    body = client.get_object(Bucket=settings.s3.bucket,
                             Key=s3x.object_key(settings.s3, "add_one", 2, "weights.bin"))["Body"].read()
    assert body == blob


def test_published_index_heads_each_version_once_and_drops_retired_ones(s3env, s3_calls):
    settings, client, repo = s3env
    for v in (1, 2):
        write_add_model(repo, v, float(v))
        publish_version(settings, repo, "add_one", v, client=client, retention=False)
    index = PublishedIndex(client, settings.s3)
    calls = s3_calls(client)
    assert index("add_one") == [1, 2]
    assert calls.calls == {"ListObjectsV2": 1, "HeadObject": 2}
    calls.reset()
    assert index("add_one") == [1, 2]
    assert calls.calls == {"ListObjectsV2": 1}  # both confirmed already: one LIST, no HEAD
    s3x.delete_keys(client, settings.s3.bucket, s3x.list_keys(client, settings.s3.bucket,
                                                              s3x.version_prefix(settings.s3, "add_one", 1)))
    assert index("add_one") == [2] == published_versions(client, settings.s3, "add_one")
