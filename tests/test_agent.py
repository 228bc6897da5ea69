"""The host agent (control/agent/) as its own process, against a real S3 endpoint (moto's server) and a
real Triton serving an (initially empty) repository directory in explicit mode. No control plane runs:
the test publishes versions and writes the desired state the way the rollout does, then watches what
the agent does through Triton, its API, and its status in S3."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from control.adapters import s3 as s3x
from control.agent.errors import AgentError
from control.agent.repository import HostRepository
from control.config import PROJECT_ROOT, AgentConfig
from control.drills.load import OpenLoopLoad, auto_spec
from control.drills.models import write_add_model
from control.local.admin_keys import admin_key, ensure_admin_key
from control.local.procs import (
    ManagedProcess,
    free_port,
    start_process,
    wait_for_process,
)
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_instance
from control.mirror.desired import DesiredState, DesiredStore, ModelState, Rejection
from control.mirror.manifest import MANIFEST_NAME
from control.mirror.publish import publish_version
from control.waiting import wait_until

TOKEN = "agent-test-token-7f3a"
MB = 1024 * 1024


class Host:
    """One Triton host: its repository directory, its Triton, its agent; the S3 mirror beside it."""
    def __init__(self, settings, tmp_path: Path):
        self.settings, self.tmp = settings, tmp_path
        self.inst = settings.instance("onprem-1")
        self.procs: dict[str, ManagedProcess] = {}
        self.build = tmp_path / "build"
        self.repo = tmp_path / "host" / "repository"
        self.repo.mkdir(parents=True)
        self.api_port = free_port()
        self.client = None
        self.store = None

    # The mirror, as the publisher and the rollout write it ----------------------------------------
    def start_s3(self) -> None:
        self.procs["s3"] = start_s3_server(self.settings)
        self.client = s3x.make_client(self.settings.s3)
        s3x.ensure_bucket(self.client, self.settings.s3)
        self.store = DesiredStore(self.client, self.settings.s3)

    def publish(self, version: int, add: float, name: str = "add_one", **kw) -> None:
        write_add_model(self.build, version, add, name, **kw)
        publish_version(self.settings, self.build, name, version, client=self.client, retention=False)

    def desire(self, model: str, stable: int, reject: dict[int, str] | None = None) -> DesiredState:
        def change(s: DesiredState) -> DesiredState:
            m = s.models.setdefault(model, ModelState())
            m.stable = stable
            for v, why in (reject or {}).items():
                m.rejected[v] = Rejection(reason=why, at=0.0, by="test")
            return s
        return self.store.update(change, by="test")

    def serving_v1(self) -> None:
        """add_one v1 published, desired, and live on this host (Triton + agent started)."""
        self.publish(1, 1.0)
        self.desire("add_one", 1)
        self.start_triton()
        self.start_agent()
        self.wait_model("add_one", live(1), "add_one v1 live")

    # The host's processes ------------------------------------------------------------------------
    def start_triton(self) -> None:
        self.procs["triton"] = start_instance(self.settings, self.inst, self.repo, ready_timeout=120)

    def agent_config(self, **agent) -> Path:
        data = yaml.safe_load(Path(self.settings.source).read_text())
        data["agent"] = {
            "instance": self.inst.name, "site": self.inst.site, "triton_url": self.inst.http_url,
            "repository_dir": str(self.repo), "interval_s": 0.5, "api_port": self.api_port,
            "token": TOKEN, "admin_key": ensure_admin_key(self.settings, self.inst),
            "load_timeout_s": 60, "advertise_http_url": self.inst.http_url,
            "advertise_agent_url": f"http://127.0.0.1:{self.api_port}", **agent}
        path = self.tmp / "agent.yaml"
        path.touch(mode=0o600)
        path.chmod(0o600)  # it holds the token and the admin key
        path.write_text(yaml.safe_dump(data))
        return path

    def argv(self, **agent) -> list[str]:
        return [sys.executable, "-m", "control.cli", "--config", str(self.agent_config(**agent)), "agent"]

    def start_agent(self, **agent) -> ManagedProcess:
        proc = start_process("agent", self.argv(**agent), self.settings.run_path, cwd=PROJECT_ROOT)
        self.procs["agent"] = proc
        wait_for_process(lambda: self.get("/healthz").status_code == 200, proc, 60, "answering /healthz")
        return proc

    def run_once(self, **agent) -> subprocess.CompletedProcess:
        """`agent --once`, as a Kubernetes init container runs it: it ends by itself."""
        return subprocess.run(self.argv(**agent) + ["--once"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=120)

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"http://127.0.0.1:{self.api_port}{path}", headers=headers, timeout=5)

    def status(self):
        return self.store.statuses()[0].get(self.inst.name)

    def wait_model(self, model: str, pred, what: str, timeout: float = 90.0) -> dict:
        def check():
            st = self.status()
            m = st.models.get(model) if st else None
            return m if m and pred(m) else None
        return wait_until(check, timeout, what, interval=0.2)

    def infer(self, model: str = "add_one") -> float:
        r = requests.post(f"{self.inst.http_url}/v2/models/{model}/infer", timeout=10,
                          json={"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                            "data": [0, 0, 0, 0]}]})
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"][0]

    def triton_index(self) -> dict[str, set[int]]:
        r = requests.post(f"{self.inst.http_url}/v2/repository/index", timeout=10,
                          headers={"admin-key": admin_key(self.settings, self.inst)})
        r.raise_for_status()
        out: dict[str, set[int]] = {}
        for m in r.json():
            if m.get("state") == "READY":
                out.setdefault(m["name"], set()).add(int(m["version"]))
        return out

    def stop(self) -> None:
        for name in ("agent", "triton", "s3"):
            if name in self.procs:
                self.procs.pop(name).stop()


@pytest.fixture
def host(settings_factory, tmp_path):
    settings = settings_factory(instances=(("onprem-1", "onprem", 100, True),), s3={"retry_attempts": 2})
    h = Host(settings, tmp_path)
    try:
        h.start_s3()
        yield h
    finally:
        h.stop()


def live(version: int):
    return lambda m: m["state"] == "live" and m["live"] == version


def test_empty_host_converges_to_the_desired_versions_and_only_then_is_ready(host):
    host.publish(1, 1.0)
    host.publish(1, 10.0, name="add_ten")
    host.desire("add_one", 1)
    host.desire("add_ten", 1)
    host.start_triton()
    assert host.triton_index() == {}  # an empty host
    agent = host.start_agent()
    first = host.get("/ready")
    assert first.status_code == 503, first.text  # the API answers before the first pass has converged
    wait_until(lambda: host.get("/ready").status_code == 200, 90, "agent /ready 200")
    assert (host.infer("add_one"), host.infer("add_ten")) == (1.0, 10.0)
    assert host.triton_index() == {"add_one": {1}, "add_ten": {1}}
    st = host.status()
    assert st.ready and st.site == "onprem" and st.http_url == host.inst.http_url
    assert st.desired_revision == host.store.read().state.revision
    assert {m: (r["state"], r["live"], r["target"]) for m, r in st.models.items()} == {
        "add_one": ("live", 1, 1), "add_ten": ("live", 1, 1)}
    # The status API needs the host's token; /ready and /metrics do not.
    assert host.get("/v1/status").status_code == 401
    assert host.get("/v1/status", token="wrong").status_code == 401
    full = host.get("/v1/status", token=TOKEN).json()
    assert full["models"]["add_one"]["live"] == 1 and full["failed_here"] == {}
    metrics = host.get("/metrics").text
    assert 'triton_hybrid_agent_model_live_version{model="add_one"} 1.0' in metrics
    assert "triton_hybrid_agent_converged 1.0" in metrics
    # Secrets: not in the agent's argv, log, pid file or any file of its state dir.
    key = admin_key(host.settings, host.inst)
    cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    looked = [cmdline, agent.log_path.read_bytes(), agent.pid_file.read_bytes()]
    looked += [p.read_bytes() for p in Path(f"{host.repo}.agent").rglob("*") if p.is_file()]
    for blob in looked:
        assert TOKEN.encode() not in blob and key.encode() not in blob


def test_new_stable_version_goes_live_under_load_without_a_failed_request(host):
    host.serving_v1()
    url = host.inst.http_url.removeprefix("http://")
    load = OpenLoopLoad(url, host.inst.grpc_url, auto_spec(host.inst.http_url, "add_one"), rate=40, duration_s=2,
                        open_ended=True).start()
    try:
        host.publish(2, 2.0)
        t0 = time.monotonic()
        host.desire("add_one", 2)
        rolled = host.wait_model("add_one", live(2), "add_one v2 live")
        took = time.monotonic() - t0
        load.extend_to(time_since(load) + 1.0)  # keep the load a moment on the new version
    finally:
        records = load.join()
    failed = [r for r in records if not r.ok]
    assert failed == [], failed[:5]
    assert {r.version for r in records} == {"1", "2"} and len(records) > 40
    assert host.triton_index()["add_one"] == {2}
    print(f"\ndesired -> live (seen in S3 status) {took:.1f}s, the agent's roll {rolled['seconds']:.1f}s; "
          f"{len(records)} requests while v2 went live, 0 failed")


def time_since(load: OpenLoopLoad) -> float:
    return time.monotonic() - load.t0


def test_a_version_that_fails_its_smoke_check_never_goes_live(host):
    host.serving_v1()
    host.publish(2, 2.0, fail=True)
    host.desire("add_one", 2)
    m = host.wait_model("add_one", lambda m: m["state"] == "failed", "add_one v2 failed")
    assert m["kind"] == "smoke" and "smoke check" in m["error"] and (m["live"], m["target"]) == (1, 2), m
    assert host.infer() == 1.0
    assert host.triton_index() == {"add_one": {1}}  # the candidate was unloaded, v2 never served
    assert not (host.repo / "add_one" / "2").exists()
    assert host.get("/ready").status_code == 503
    # Not retried: the next passes report the same failure (the rollout ties it to v2), v1 keeps serving.
    first_error = m["error"]
    m = host.wait_model("add_one", lambda m: m["reason"] == "failed-on-this-host", "add_one v2 not retried")
    assert (m["state"], m["error"], m["live"]) == ("failed", first_error, 1), m
    assert host.infer() == 1.0


def test_a_killed_download_resumes_and_triton_never_sees_a_half_version(host):
    size = 24 * MB
    weights = os.urandom(size)
    host.publish(1, 1.0)
    host.publish(2, 2.0, extra={"weights.bin": weights})
    host.desire("add_one", 1)
    host.start_triton()
    agent = host.start_agent(pull_bandwidth_mb_s=6)
    host.wait_model("add_one", live(1), "add_one v1 live")
    host.desire("add_one", 2)
    staging = Path(f"{host.repo}.agent") / "staging" / "add_one"

    def part():
        parts = list(staging.rglob("weights.bin.part")) if staging.exists() else []
        return parts[0] if parts and parts[0].stat().st_size > 4 * MB else None
    p = wait_until(part, 60, "the download of weights.bin under way")
    agent.signal(signal.SIGKILL)
    wait_until(lambda: not agent.alive, 10, "the agent dead")
    had = p.stat().st_size
    assert 0 < had < size
    assert not (host.repo / "add_one" / "2").exists()  # nothing half-pulled is in the repository
    assert host.triton_index() == {"add_one": {1}} and host.infer() == 1.0
    host.procs.pop("agent").stop()
    agent = host.start_agent(pull_bandwidth_mb_s=6)
    host.wait_model("add_one", live(2), "add_one v2 live after the restart")
    assert host.infer() == 2.0
    assert hashlib.sha256((host.repo / "add_one" / "2" / "weights.bin").read_bytes()).digest() == \
        hashlib.sha256(weights).digest()
    pulled = float(next(line.split()[-1] for line in host.get("/metrics").text.splitlines()
                        if line.startswith("triton_hybrid_agent_pulled_bytes_total")))
    assert pulled <= size - had + MB, f"the restarted agent downloaded {pulled:.0f} bytes; it had {had} already"
    # Triton was asked to load v2 only once it was complete: its log names no failed load of it.
    log = host.procs["triton"].log_path.read_text(errors="replace")
    assert "failed to load 'add_one' version 2" not in log
    print(f"\nkilled with {had / MB:.1f} MiB of {size / MB:.0f} MiB; the restart downloaded {pulled / MB:.1f} MiB")


def test_stray_and_damaged_keys_and_rejected_versions_block_no_other_model(host):
    s3cfg, bucket = host.settings.s3, host.settings.s3.bucket
    host.publish(1, 1.0)
    host.publish(1, 5.0, name="add_five")
    host.publish(1, 7.0, name="add_seven")
    # Stray keys beside the versions and a damaged manifest of another model's target.
    for key in (f"{s3cfg.prefix}/add_one/notaversion/x", f"{s3cfg.prefix}/add_one/01/x", f"{s3cfg.prefix}/junk/x"):
        host.client.put_object(Bucket=bucket, Key=key, Body=b"stray")
    bad_key = s3x.object_key(s3cfg, "add_five", 1, MANIFEST_NAME)
    host.client.put_object(Bucket=bucket, Key=bad_key, Body=b"{not json")
    host.desire("add_five", 1)
    host.desire("ghost", 3)                                   # never published
    host.desire("add_seven", 1, reject={1: "broke search in canary"})  # rejected and still the target
    host.desire("add_one", 1)
    host.start_triton()
    agent = host.start_agent()
    host.wait_model("add_one", live(1), "add_one v1 live")
    five = host.wait_model("add_five", lambda m: m["state"] == "waiting", "add_five reported")
    assert bad_key in five["error"] and five["kind"] == "manifest", five
    ghost = host.wait_model("ghost", lambda m: m["kind"] == "unpublished", "ghost reported")
    assert ghost["live"] is None
    seven = host.wait_model("add_seven", lambda m: m["state"] == "refused", "add_seven refused")
    assert seven["kind"] == "rejected" and "broke search in canary" in seven["error"], seven
    assert host.infer() == 1.0
    assert host.triton_index() == {"add_one": {1}}
    assert not (host.repo / "add_seven").exists() and not (host.repo / "add_five").exists()
    wait_until(lambda: bad_key in agent.log_path.read_text(), 10, "a warning naming the damaged manifest")
    assert any("WARNING" in line and bad_key in line for line in agent.log_path.read_text().splitlines())
    assert host.get("/ready").status_code == 503
    # A rejected version that becomes a live model's target is never pulled nor loaded either.
    host.publish(2, 2.0)
    rev = host.desire("add_one", 2, reject={2: "bad"}).revision
    wait_until(lambda: host.status().desired_revision >= rev, 30, "the agent at the new desired revision")
    one = host.status().models["add_one"]
    assert (one["state"], one["kind"], one["live"]) == ("refused", "rejected", 1), one
    assert not (host.repo / "add_one" / "2").exists() and host.triton_index()["add_one"] == {1}
    metrics = host.get("/metrics").text
    assert 'triton_hybrid_agent_pulls_total{result="ok"} 1.0' in metrics  # add_one v1 only


def test_once_prepares_a_host_before_triton_starts_and_fails_when_it_cannot(host):
    host.publish(1, 1.0)
    host.desire("add_one", 1)
    done = host.run_once()
    assert done.returncode == 0, done.stderr[-3000:]
    assert (host.repo / "add_one" / "1" / "model.py").is_file()
    host.start_triton()  # loads what the init container prepared
    assert host.infer() == 1.0
    host.start_agent()
    host.wait_model("add_one", live(1), "add_one v1 verified live")
    host.procs.pop("agent").stop()
    host.desire("add_one", 9)  # never published: not converged -> non-zero
    done = host.run_once()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "not converged" in done.stderr and "add_one v9 is not published" in done.stderr
    assert host.infer() == 1.0


def test_desired_state_is_read_again_only_when_it_changed(host):
    """ETag-conditional GET: an unchanged desired.json costs a 304, no body, no parse."""
    from control.agent.main import Agent  # noqa: PLC0415 - the in-process agent, only here

    cfg = AgentConfig(instance="onprem-1", repository_dir=str(host.repo), triton_url=host.inst.http_url)
    agent = Agent(host.settings.s3, cfg)  # its own client: only its own calls are counted
    assert agent.read_desired().models == {}  # no desired state yet: nothing to serve
    host.desire("add_one", 1)
    first = agent.read_desired()
    statuses = []
    agent.client.meta.events.register("after-call.s3.GetObject",
                                     lambda http_response, **_: statuses.append(http_response.status_code))
    assert agent.read_desired() is first and statuses == [304]
    host.desire("add_one", 2)
    assert agent.read_desired().models["add_one"].stable == 2 and statuses == [304, 200]


def test_agent_refuses_its_secrets_in_a_config_file_others_can_read(host):
    argv = host.argv()
    (host.tmp / "agent.yaml").chmod(0o644)
    done = subprocess.run(argv + ["--once"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "chmod 600" in done.stderr and TOKEN not in done.stderr + done.stdout


def test_pull_resumes_a_part_file_refetches_a_wrong_one_and_refuses_an_oversized_object(host):
    """control/agent/pull.py in-process against the real S3 endpoint (no Triton needed)."""
    from control.agent.pull import pull_version  # noqa: PLC0415
    from control.mirror.publish import read_manifest  # noqa: PLC0415

    s3cfg = host.settings.s3
    weights = os.urandom(3 * MB)
    host.publish(1, 1.0, extra={"weights.bin": weights})
    m = read_manifest(host.client, s3cfg, "add_one", 1)
    repo = HostRepository(host.repo, host.tmp / "state").ensure()
    stage = repo.staging_dir("add_one", 1, m.content_sha256) / "version"
    stage.mkdir(parents=True)
    (stage / "weights.bin.part").write_bytes(weights[:MB])  # a download killed after 1 MiB
    got = []
    assert pull_version(host.client, s3cfg, repo, m, on_bytes=got.append)
    weights_bytes = sum(got) - sum(f.size for f in m.files if f.path != "weights.bin")
    assert weights_bytes == 2 * MB  # only the rest of it
    assert (host.repo / "add_one" / "1" / "weights.bin").read_bytes() == weights
    assert not repo.staging_dir("add_one", 1, m.content_sha256).exists()
    assert not pull_version(host.client, s3cfg, repo, m)  # verified copy there: nothing downloaded

    repo.remove_version("add_one", 1)
    stage.mkdir(parents=True)
    (stage / "weights.bin.part").write_bytes(os.urandom(MB))  # a .part that is not a prefix of the file
    assert pull_version(host.client, s3cfg, repo, m)
    assert (host.repo / "add_one" / "1" / "weights.bin").read_bytes() == weights

    repo.remove_version("add_one", 1)
    key = s3x.object_key(s3cfg, "add_one", 1, "weights.bin")
    host.client.put_object(Bucket=s3cfg.bucket, Key=key, Body=weights + os.urandom(4 * MB))
    got.clear()
    with pytest.raises(AgentError, match="larger than") as e:
        pull_version(host.client, s3cfg, repo, m, on_bytes=got.append)
    assert e.value.kind == "verify" and sum(got) <= 3 * MB + 1 + 4096  # stopped at manifest size + 1
    assert not (host.repo / "add_one" / "1").exists()


def test_a_new_version_downloads_only_its_changed_files(host):
    """A file of the new version that the host already holds (same sha256 and size, in a verified
    version) is hard-linked, not downloaded: the publisher copied it inside S3, the agent need not
    move it over the network either."""
    from control.agent.pull import pull_version  # noqa: PLC0415
    from control.mirror.publish import read_manifest  # noqa: PLC0415

    s3cfg = host.settings.s3
    weights = os.urandom(2 * MB)
    host.publish(1, 1.0, extra={"weights.bin": weights})
    host.publish(2, 2.0, extra={"weights.bin": weights})  # model.py changed, weights.bin not
    repo = HostRepository(host.repo, host.tmp / "state").ensure()
    m1, m2 = (read_manifest(host.client, s3cfg, "add_one", v) for v in (1, 2))
    assert pull_version(host.client, s3cfg, repo, m1)
    got = []
    assert pull_version(host.client, s3cfg, repo, m2, on_bytes=got.append)
    in_v1 = {(f.sha256, f.size) for f in m1.files}
    changed = [f for f in m2.files if (f.sha256, f.size) not in in_v1]
    assert [f.path for f in changed] == ["model.py"] and sum(got) == changed[0].size  # config.pbtxt, weights: linked
    new, old = host.repo / "add_one" / "2" / "weights.bin", host.repo / "add_one" / "1" / "weights.bin"
    assert new.read_bytes() == weights and new.stat().st_ino == old.stat().st_ino
    # A local copy that no longer matches its manifest is not reused: downloaded instead.
    repo.remove_version("add_one", 2)
    os.chmod(old, 0o600)
    old.write_bytes(os.urandom(2 * MB))  # damaged on disk (also changes the linked inode: v2 is gone)
    got.clear()
    assert pull_version(host.client, s3cfg, repo, m2, on_bytes=got.append)
    assert sum(got) >= 2 * MB and (host.repo / "add_one" / "2" / "weights.bin").read_bytes() == weights
