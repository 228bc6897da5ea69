"""Supervised child processes: each runs in its own process group, logs to a file in the run dir
and leaves a pid file there, so `down` (or a test) stops exactly what `up` started and nothing
else. Never kill by name."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests

from control import waiting


class ComponentError(RuntimeError):
    """A component failed to start or stop; the message names it and shows its log tail."""

    def __init__(self, component: str, message: str, log_tail: str = ""):
        self.component = component
        self.log_tail = log_tail
        text = f"{component}: {message}"
        if log_tail:
            text += f"\n--- last lines of the {component} log ---\n{log_tail}"
        super().__init__(text)


def tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port, never one this process handed out before (the kernel may offer a just-closed
    ephemeral port again, and a stack's config must not name one port twice)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(-1, ...) would signal every process we may signal
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class ManagedProcess:
    """A running component. The pid file records pid, process group and the command, so a later
    `down` can check that the pid still belongs to what we started before signalling it."""

    name: str
    pid: int
    pid_file: Path
    log_path: Path

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 25) -> str:
        return tail(self.log_path, lines)

    def signal(self, sig: int) -> None:
        if self.pid <= 0:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL; remove the pid file."""
        if self.alive:
            self.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive:
                self.signal(signal.SIGKILL)
                deadline = time.monotonic() + 5
                while self.alive and time.monotonic() < deadline:
                    time.sleep(0.05)
        else:
            self.signal(signal.SIGKILL)  # leftovers of the group, if any
        self.pid_file.unlink(missing_ok=True)


def pid_file_for(run_dir: Path, name: str) -> Path:
    return run_dir / "pids" / f"{name}.json"


def log_file_for(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


def start_process(name: str, argv: list[str], run_dir: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> ManagedProcess:
    run_dir = Path(run_dir)
    log_path = log_file_for(run_dir, name)
    pid_file = pid_file_for(run_dir, name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    existing = load_managed(run_dir, name)
    if existing is not None and existing.alive:
        raise ComponentError(name, f"already running (pid {existing.pid}); stop it first")
    log = open(log_path, "ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
    log.flush()
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    except FileNotFoundError:
        raise ComponentError(name, f"cannot start: {argv[0]} not found") from None
    finally:
        log.close()
    pid_file.write_text(json.dumps({"pid": proc.pid, "argv": argv, "started": time.time(),
                                    "proc_start": _proc_start_time(proc.pid)}))
    return ManagedProcess(name, proc.pid, pid_file, log_path)


def load_managed(run_dir: Path, name: str) -> ManagedProcess | None:
    """The process a pid file describes, if its pid is still the command we started."""
    pid_file = pid_file_for(Path(run_dir), name)
    try:
        info = json.loads(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = int(info["pid"])
    mp = ManagedProcess(name, pid, pid_file, log_file_for(Path(run_dir), name))
    if _proc_start_time(pid) != info.get("proc_start"):
        # The pid died or was reused by an unrelated process: never signal it.
        mp.pid = -1
    return mp


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, IndexError):
        return None


def managed_names(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(run_dir) / "pids").glob("*.json"))


def wait_for_process(check: Callable[[], bool], proc: ManagedProcess, timeout: float, what: str,
                     interval: float = 0.1) -> None:
    """Wait for `check()` on a component; fail fast if its process dies, with its log tail."""
    try:
        waiting.wait_until(check, timeout, what, interval=interval,
                           abort=lambda: None if proc.alive else "process exited")
    except waiting.WaitTimeout:
        raise ComponentError(proc.name, f"not {what} after {timeout:.0f}s", proc.log_tail()) from None
    except RuntimeError:
        raise ComponentError(proc.name, f"exited while waiting for {what}", proc.log_tail()) from None


def http_ok(url: str, timeout: float = 1.0) -> bool:
    return requests.get(url, timeout=timeout).status_code == 200
