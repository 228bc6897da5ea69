"""Structural checks of the systemd units in deploy/systemd/ (systemd's own parser, `systemd-analyze
verify`, runs in the tests where it is installed; it knows the syntax, not what these units are for).

An on-prem GPU host runs two units: Triton serves the repository directory that only its host agent
writes (docs/agent.md): explicit model control with `--load-model=*` (at start Triton loads what
the agent's live configs name; every change after is the agent's, through the repository API), the
directory read-only to Triton; the agent runs `triton-hybrid agent`
after Triton, may write only the repository and its state directory, and gets its secrets as
systemd credentials.
"""
from __future__ import annotations

import re
from pathlib import Path

TRITON_UNIT = "triton-hybrid-triton.service"
AGENT_UNIT = "triton-hybrid-agent.service"
HARDENING = {"NoNewPrivileges": "true", "ProtectSystem": "strict", "PrivateTmp": "true", "ProtectHome": "true"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}: comments dropped, `\\` continuations joined, repeated keys
    kept (systemd allows ExecReload= twice, LoadCredential= once per credential)."""
    units: dict[str, dict[str, list[str]]] = {}
    section, pending = None, ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            units.setdefault(section, {})
        elif "=" in line and section is not None:
            key, value = line.split("=", 1)
            units[section].setdefault(key.strip(), []).append(value.strip())
        else:
            raise ValueError(f"not a unit-file line (section {section}): {raw!r}")
    return units


def _one(unit: dict, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    return values[-1] if values else ""


def _words(unit: dict, section: str, key: str) -> list[str]:
    return [w for v in unit.get(section, {}).get(key, []) for w in v.split()]


def host_unit_problems(units_dir: Path, repository_dir: str, state_dir: str) -> list[str]:
    """What is wrong with the Triton + agent pair of an on-prem GPU host, given the agent config's
    repository and state directories."""
    p: list[str] = []
    paths = {n: Path(units_dir) / n for n in (TRITON_UNIT, AGENT_UNIT)}
    missing = [n for n, f in paths.items() if not f.is_file()]
    if missing:
        return [f"{units_dir}: no {', '.join(missing)} (Triton and its host agent run side by side)"]
    triton, agent = (parse_unit(paths[n].read_text()) for n in (TRITON_UNIT, AGENT_UNIT))
    tstart = " ".join(triton.get("Service", {}).get("ExecStart", []))
    repo = re.search(r"--model-repository=(\S+)", tstart)
    if not repo or repo.group(1) != repository_dir:
        p.append(f"{TRITON_UNIT}: --model-repository must be the agent's repository_dir {repository_dir} "
                 f"(has {repo.group(1) if repo else 'none'})")
    if "--model-control-mode=explicit" not in tstart:
        p.append(f"{TRITON_UNIT}: Triton must run with --model-control-mode=explicit (its agent loads the models)")
    if "--load-model=*" not in tstart.replace("'", "").replace('"', ""):
        p.append(f"{TRITON_UNIT}: Triton must start with --load-model=* (the versions its agent's live configs name)")
    writable = _words(triton, "Service", "ReadWritePaths") + _words(triton, "Service", "StateDirectory")
    if any(repository_dir == w.rstrip("/") or repository_dir.startswith(w.rstrip("/") + "/") for w in writable):
        p.append(f"{TRITON_UNIT}: Triton may write {writable}; the repository must be read-only to it (the "
                 "agent is its only writer)")
    if "triton-admin-key" not in " ".join(triton.get("Service", {}).get("LoadCredential", [])):
        p.append(f"{TRITON_UNIT}: the admin key must come from LoadCredential=triton-admin-key:…")
    astart = " ".join(agent.get("Service", {}).get("ExecStart", []))
    if not re.search(r"\btriton-hybrid agent'?$", astart.strip()):
        p.append(f"{AGENT_UNIT}: ExecStart must run `triton-hybrid agent` (the loop; has {astart!r})")
    for key in ("After", "Wants"):
        if TRITON_UNIT not in _words(agent, "Unit", key):
            p.append(f"{AGENT_UNIT}: {key}= must name {TRITON_UNIT}")
    if sorted(_words(agent, "Service", "ReadWritePaths")) != sorted([repository_dir, state_dir]):
        p.append(f"{AGENT_UNIT}: ReadWritePaths= must be exactly the repository and the state dir "
                 f"({repository_dir} {state_dir}); has {_words(agent, 'Service', 'ReadWritePaths')}")
    for key, want in HARDENING.items():
        for name, unit in ((TRITON_UNIT, triton), (AGENT_UNIT, agent)):
            if _one(unit, "Service", key) != want:
                p.append(f"{name}: needs {key}={want}")
    creds = " ".join(agent.get("Service", {}).get("LoadCredential", []))
    for cred, env in (("agent-token", "TRITON_HYBRID__AGENT__TOKEN_FILE"),
                      ("triton-admin-key", "TRITON_HYBRID__AGENT__ADMIN_KEY_FILE")):
        if f"{cred}:" not in creds or f'{env}="$${{CREDENTIALS_DIRECTORY}}/{cred}"' not in astart:
            p.append(f"{AGENT_UNIT}: {cred} must be a LoadCredential= read through {env}")
    return p
