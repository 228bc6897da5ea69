"""Supervised child processes: each runs in its own process group, logs to a file in the run dir
and leaves a pid file there, so `down` (or a test) stops exactly what `up` started and nothing
else. Never kill by name.

Ownership: every process started here gets a random token in its environment
(TRITON_HYBRID_PROC_TOKEN), recorded in its pid file; the children it forks (Triton's
Python-backend stubs) inherit it. A leader that dies from outside (kill -9, the OOM killer) can
leave such children running in its process group, re-parented to init. A process group id cannot
be reused while any process is still in the group, so when members carrying our token remain,
the group is ours and is signalled as a whole (`stop`, `reap`), also when the leader is gone.
Files: the run dir and its pids/ and logs/ are 0700, pid files and logs 0600; argv secrets are
redacted in pid files (they stay only on the command line of the process that needs them).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from control import waiting

TOKEN_ENV = "TRITON_HYBRID_PROC_TOKEN"
REDACTED = "<redacted>"
# Any `admin-key=VALUE` in an argv is a secret even if the caller forgot to name it.
_SECRET_ARG = re.compile(r"(admin-key=)[^,\s]+")
# After the leader is gone: how long to wait for SIGKILLed group members to disappear.
_REAP_TIMEOUT_S = 5.0


class ComponentError(RuntimeError):
    """A component failed to start or stop; the message names it and shows its log tail."""

    def __init__(self, component: str, message: str, log_tail: str = ""):
        self.component, self.message, self.log_tail = component, message, log_tail
        text = f"{component}: {message}"
        if log_tail:
            text += f"\n--- last lines of the {component} log ---\n{log_tail}"
        super().__init__(text)


class AlreadyRunning(ComponentError):
    """start_process found the component's recorded process alive."""


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


def private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700 (and tighten an existing one we own): run-dir contents are
    secrets, logs and state that other users of the host have no business reading."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def redact(argv: list[str], secret_values: Iterable[str] = ()) -> list[str]:
    """argv with every secret value and every `admin-key=...` replaced, for pid files and logs."""
    out = []
    for arg in argv:
        for s in secret_values:
            if s:
                arg = arg.replace(s, REDACTED)
        out.append(_SECRET_ARG.sub(rf"\g<1>{REDACTED}", arg))
    return out


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
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [2] pgrp, [19] start time."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return _stat_fields(pid)[19]
    except (OSError, IndexError):
        return None


def _carries_token(pid: int, token: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's process: not ours
        return False
    return f"{TOKEN_ENV}={token}".encode() in env


def processes_in_group(pgid: int) -> list[int]:
    """Every live (non-zombie) process whose process group is `pgid`, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def group_members(pgid: int, token: str | None) -> list[int]:
    """The processes of group `pgid` that carry our start token. Without a token (a pid file
    written before tokens existed) nothing can be proven ours."""
    if pgid <= 0 or not token:
        return []
    return [pid for pid in processes_in_group(pgid) if _carries_token(pid, token)]


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of these processes (VmRSS from /proc), for reports on leftovers."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return total


@dataclass
class ManagedProcess:
    """A running component. The pid file records pid, process group, start time and ownership
    token, so a later `down` can check that the pid still belongs to what we started before
    signalling it, and find what the process left behind if it died from outside."""

    name: str
    pid: int
    pid_file: Path
    log_path: Path
    proc_start: str | None = None
    token: str | None = None
    meta: dict = field(default_factory=dict)
    stopping: bool = False

    @property
    def pgid(self) -> int:
        return self.pid  # start_new_session: the leader's pid is the group id

    @property
    def alive(self) -> bool:
        """The leader runs (and is the process we started, not a reused pid)."""
        if not pid_alive(self.pid):
            return False
        return self.proc_start is None or _proc_start_time(self.pid) == self.proc_start

    def members(self) -> list[int]:
        """Every live process of our group (leader included), proven ours by the token."""
        return group_members(self.pgid, self.token)

    def leftovers(self) -> list[int]:
        """Processes of the group still running although the leader is dead."""
        return [] if self.alive else self.members()

    def log_tail(self, lines: int = 25) -> str:
        return tail(self.log_path, lines)

    def signal(self, sig: int) -> None:
        """Signal the whole group: while the leader lives, or while members of it remain (then
        the group id cannot have been reused). Nothing when neither holds."""
        if self.pid <= 0 or not (self.alive or self.members()):
            return
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def reap(self, timeout: float = _REAP_TIMEOUT_S) -> list[int]:
        """SIGKILL what is left of a group whose leader died; wait until it is empty. Returns the
        pids that were left. Raises ComponentError when some refuse to go (e.g. stuck in D state)."""
        left = self.leftovers()
        if not left:
            return []
        self.signal(signal.SIGKILL)
        try:
            waiting.wait_until(lambda: not self.members(), timeout, f"the leftovers of {self.name} to exit",
                               interval=0.02)
        except waiting.WaitTimeout:
            raise ComponentError(self.name, f"processes {self.members()} of its group survive SIGKILL") from None
        return left

    def _mark_stopping(self) -> None:
        """Tell a supervisor that this stop is intended (no restart)."""
        try:
            info = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return
        if info.get("pid") == self.pid:
            info["stopping"] = True
            write_private(self.pid_file, json.dumps(info))
        self.stopping = True

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait for the leader, then SIGKILL whatever is left of the
        group (also the leftovers of a leader that died from outside); remove the pid file once
        the group is empty."""
        self._mark_stopping()
        if self.alive:
            self.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            try:
                waiting.wait_until(lambda: not self.alive, timeout, f"{self.name} to exit", interval=0.05)
            except waiting.WaitTimeout:
                self.signal(signal.SIGKILL)
                try:
                    waiting.wait_until(lambda: not self.alive, _REAP_TIMEOUT_S, f"{self.name} to exit after SIGKILL",
                                       interval=0.05)
                except waiting.WaitTimeout:
                    raise ComponentError(self.name, f"pid {self.pid} survives SIGKILL (stuck in the kernel?)") from None
        self.reap()
        self.pid_file.unlink(missing_ok=True)


def pid_file_for(run_dir: Path, name: str) -> Path:
    return run_dir / "pids" / f"{name}.json"


def log_file_for(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


@contextmanager
def _start_lock(run_dir: Path, name: str):
    """One starter at a time per component (`up` and the supervisor may race)."""
    lock = private_dir(run_dir / "pids") / f".{name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start_process(name: str, argv: list[str], run_dir: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None, secret_values: Iterable[str] = (),
                  meta: dict | None = None) -> ManagedProcess:
    """Start `argv` in a process group of its own. `secret_values` (and any `admin-key=...`) are
    redacted in the pid file; `meta` is recorded there for a supervisor."""
    run_dir = private_dir(Path(run_dir))
    log_path = log_file_for(run_dir, name)
    pid_file = pid_file_for(run_dir, name)
    private_dir(log_path.parent)
    private_dir(pid_file.parent)
    with _start_lock(run_dir, name):
        existing = load_managed(run_dir, name)
        if existing is not None:
            if existing.alive:
                raise AlreadyRunning(name, f"already running (pid {existing.pid}); stop it first")
            existing.reap()  # what a predecessor that died from outside left behind
        token = secrets.token_hex(16)
        env = dict(os.environ if env is None else env)
        env[TOKEN_ENV] = token
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=cwd, start_new_session=True)
            except FileNotFoundError:
                raise ComponentError(name, f"cannot start: {argv[0]} not found") from None
        proc_start = _proc_start_time(proc.pid)
        write_private(pid_file, json.dumps({
            "pid": proc.pid, "pgid": proc.pid, "argv": redact(argv, secret_values), "started": time.time(),
            "proc_start": proc_start, "token": token, "meta": meta or {}}))
    return ManagedProcess(name, proc.pid, pid_file, log_path, proc_start, token, dict(meta or {}))


def load_managed(run_dir: Path, name: str) -> ManagedProcess | None:
    """The process a pid file describes. Its `alive` is true only while the pid is still the
    process we started; `leftovers()` lists what remains of its group when it is not."""
    pid_file = pid_file_for(Path(run_dir), name)
    try:
        info = json.loads(pid_file.read_text())
        pid = int(info["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    # A pid file without a start time cannot tell a reused pid apart: never treat it as ours.
    proc_start = info.get("proc_start") or "unknown"
    return ManagedProcess(name, pid, pid_file, log_file_for(Path(run_dir), name), proc_start,
                          info.get("token"), info.get("meta") or {}, bool(info.get("stopping")))


def managed_names(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(run_dir) / "pids").glob("*.json"))


class NotReady(ComponentError):
    """wait_for_process gave up: the component did not pass its check in time, or exited."""


def wait_for_process(check: Callable[[], bool], proc: ManagedProcess, timeout: float, what: str,
                     interval: float = 0.1, log_lines: int = 25,
                     failed: Callable[[], str | None] | None = None) -> None:
    """Wait for `check()` on a component; fail fast if its process dies, with its log tail, or when
    `failed()` names a reason the wait can never succeed."""
    def abort() -> str | None:
        if not proc.alive:
            return "process exited"
        return failed() if failed is not None else None

    try:
        waiting.wait_until(check, timeout, what, interval=interval, abort=abort)
    except waiting.WaitTimeout:
        raise NotReady(proc.name, f"not {what} after {timeout:.0f}s", proc.log_tail(log_lines)) from None
    except RuntimeError as e:
        raise NotReady(proc.name, f"{e}", proc.log_tail(log_lines)) from None


def require_free_ports(component: str, ports: Iterable[tuple[str, str, int]],
                       remedy: str = "free it or change it in the config") -> None:
    """Fail before starting `component` when one of its (setting, host, port) is already bound."""
    for setting, host, port in ports:
        if port_in_use(host, port):
            raise ComponentError(component, f"port {host}:{port} ({setting}) is already in use; {remedy}")


def wait_ports_free(ports: Iterable[tuple[str, str, int]], timeout_s: float) -> bool:
    """True once none of the (setting, host, port) is bound any more; False if one still is after
    timeout_s (the start that follows then fails with require_free_ports' clear error)."""
    ports = list(ports)
    try:
        waiting.wait_until(lambda: not any(port_in_use(h, p) for _, h, p in ports), timeout_s, "ports free")
        return True
    except waiting.WaitTimeout:
        return False


def start_ready(name: str, argv: list[str], run_dir: Path, check: Callable[[], bool], timeout: float, what: str,
                log_lines: int = 25, **start_kwargs) -> ManagedProcess:
    """start_process, then wait_for_process; a component that does not get ready is stopped again
    (the NotReady raised carries its log tail from before the stop)."""
    proc = start_process(name, argv, run_dir, **start_kwargs)
    try:
        wait_for_process(check, proc, timeout, what, log_lines=log_lines)
    except ComponentError:
        proc.stop()
        raise
    return proc


def http_ok(url: str, timeout: float = 1.0) -> bool:
    return requests.get(url, timeout=timeout).status_code == 200
