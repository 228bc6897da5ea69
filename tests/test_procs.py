"""control/local/procs.py with real processes (no Triton needed): a leader killed from outside
leaves children in its process group; `stop` of the component's pid file reaps them, and never
signals a process that is not provably ours. Pid files carry no secret and are private."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from control.local.procs import (
    ManagedProcess,
    load_managed,
    pid_alive,
    pid_file_for,
    start_process,
)
from control.local.procs import (
    processes_in_group as group_of,
)
from control.waiting import wait_until

# A leader that forks a child which outlives it (like Triton's Python-backend stubs when Triton
# is killed with SIGKILL): both in the leader's process group, the child ignoring SIGTERM/SIGHUP.
LEADER_WITH_CHILD = [sys.executable, "-c", (
    "import os, signal, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(600)\n")]


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def cleanup():
    """SIGKILL, by pid, whatever a test's process groups still hold at the end (also on failure)."""
    groups: list[int] = []
    yield groups.append
    for pgid in groups:
        for pid in group_of(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_leader_with_child(run_dir, cleanup, name="comp") -> tuple[ManagedProcess, int]:
    proc = start_process(name, LEADER_WITH_CHILD, run_dir)
    cleanup(proc.pid)
    child = wait_until(lambda: [p for p in group_of(proc.pid) if p != proc.pid], 10, "the child to start")[0]
    return proc, child


def kill_leader_only(proc: ManagedProcess) -> None:
    """kill -9 of the leader alone (what the OOM killer or an operator does), then let it be reaped."""
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(proc.pid), 5, "the leader to die")


def test_stop_from_pid_file_reaps_the_group_of_a_leader_killed_from_outside(run_dir, cleanup):
    proc, child = start_leader_with_child(run_dir, cleanup)
    kill_leader_only(proc)
    assert pid_alive(child) and group_of(proc.pid) == [child]  # left behind, re-parented to init
    loaded = load_managed(run_dir, "comp")
    assert loaded is not None and not loaded.alive
    loaded.stop()
    assert group_of(proc.pid) == []
    assert not pid_file_for(run_dir, "comp").exists()


def test_leftovers_are_reported_and_a_restart_reaps_them_first(run_dir, cleanup):
    proc, child = start_leader_with_child(run_dir, cleanup)
    kill_leader_only(proc)
    assert load_managed(run_dir, "comp").leftovers() == [child]
    again = start_process("comp", [sys.executable, "-c", "import time; time.sleep(600)"], run_dir)
    cleanup(again.pid)
    assert not pid_alive(child)
    again.stop()


def test_a_group_not_proven_ours_is_never_signalled(run_dir, cleanup):
    proc, child = start_leader_with_child(run_dir, cleanup)
    kill_leader_only(proc)
    info = json.loads(pid_file_for(run_dir, "comp").read_text())
    info["token"] = "not-the-token-we-started-it-with"
    pid_file_for(run_dir, "comp").write_text(json.dumps(info))
    load_managed(run_dir, "comp").stop()
    assert pid_alive(child)


def test_a_reused_pid_is_never_signalled(run_dir, cleanup):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    cleanup(stranger.pid)
    pid_file_for(run_dir, "comp").parent.mkdir(parents=True)
    pid_file_for(run_dir, "comp").write_text(json.dumps({"pid": stranger.pid, "proc_start": "1", "token": "x"}))
    proc = load_managed(run_dir, "comp")
    assert not proc.alive
    proc.stop()
    assert stranger.poll() is None


def test_pid_file_has_no_secret_and_run_dir_files_are_private(run_dir, cleanup):
    key = "s3cr3t-admin-key-value"
    argv = [sys.executable, "-c", "import time; time.sleep(600)", f"--http-restricted-api=model-repository:admin-key={key}",
            "--password", "other-secret"]
    proc = start_process("comp", argv, run_dir, secret_values=["other-secret"])
    cleanup(proc.pid)
    text = pid_file_for(run_dir, "comp").read_text()
    assert key not in text and "other-secret" not in text
    assert "admin-key=<redacted>" in text
    for path, mode in ((run_dir, 0o700), (run_dir / "pids", 0o700), (run_dir / "logs", 0o700),
                       (pid_file_for(run_dir, "comp"), 0o600), (proc.log_path, 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    proc.stop()


def test_wait_ports_free_waits_for_a_release_and_gives_up_on_a_held_port():
    """What the supervisor does before a restart: the dead process's port is released a moment
    after its death; one that stays taken is reported (False) after the wait."""
    import socket  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from control.local.procs import free_port, port_in_use, wait_ports_free  # noqa: PLC0415

    port = free_port()
    held = socket.socket()
    held.bind(("127.0.0.1", port))
    held.listen()
    ports = [("agent_port", "127.0.0.1", port)]
    assert port_in_use("127.0.0.1", port)
    assert wait_ports_free(ports, 0.3) is False
    threading.Timer(0.3, held.close).start()
    assert wait_ports_free(ports, 10) is True
    assert not port_in_use("127.0.0.1", port)
