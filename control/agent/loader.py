"""Bring a verified version live on this host's Triton, through its repository API, without a failed request.

1. candidate: the version is loaded under a private name (`<model>__candidate_v<N>`, hard links to
   the same files) and smoke-tested. Clients never call that name, so a version that loads but
   answers wrongly is never seen by them; the candidate is unloaded and removed either way;
2. go live: the model's config.pbtxt is rewritten (atomically) to name the new version and the
   model is reloaded. Triton keeps the old version serving until the new one is loaded, so requests
   never fail during the switch. Wait ready, smoke again;
3. on any failure: the previous config.pbtxt is restored and reloaded (the old version keeps
   serving); the new version's directory is removed unless it was the one serving.
"""
from __future__ import annotations

import logging

from control.adapters.triton import TritonAdmin, TritonAdminError, TritonUnreachable
from control.agent.errors import AgentError, FailureKind
from control.agent.repository import HostRepository
from control.agent.smoke import SmokeFn, smoke_for

log = logging.getLogger("triton_hybrid.agent.loader")


class Loader:
    def __init__(self, admin: TritonAdmin, repo: HostRepository, *, load_timeout_s: float, smoke_timeout_s: float,
                 smokes: dict[str, SmokeFn] | None = None):
        self.admin, self.repo = admin, repo
        self.load_timeout_s, self.smoke_timeout_s = load_timeout_s, smoke_timeout_s
        self.smokes = dict(smokes or {})

    # Steps ---------------------------------------------------------------------------------------
    def _load(self, name: str, what: str) -> None:
        try:
            self.admin.load(name)
        except TritonUnreachable as e:
            raise AgentError(FailureKind.UNREACHABLE, str(e)) from None
        except TritonAdminError as e:
            raise AgentError(FailureKind.LOAD, f"{what}: {e}") from None

    def _wait_ready(self, name: str, version: int, what: str) -> None:
        if not self.admin.wait_model_ready(name, version, timeout=self.load_timeout_s):
            raise AgentError(FailureKind.LOAD, f"{what} is not ready {self.load_timeout_s:g}s after loading")

    def smoke(self, model: str, name: str, version: int, version_dir) -> None:
        fn = self.smokes.get(model) or smoke_for(model)
        try:
            fn(self.admin, name, version, version_dir, self.smoke_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure of the check is the version's failure
            raise AgentError(FailureKind.SMOKE, f"{model} v{version} failed its smoke check: {e}") from None

    def remove_candidates(self) -> None:
        """Left over by an agent that died mid-check: unload and remove."""
        for name in self.repo.candidates():
            try:
                self.admin.unload(name)
            except TritonAdminError:
                pass
            self.repo.remove_candidate(name)

    def candidate_check(self, model: str, version: int) -> None:
        name, cvdir = self.repo.build_candidate(model, version)
        try:
            self._load(name, f"{model} v{version} does not load")
            self._wait_ready(name, version, f"{model} v{version} (candidate)")
            self.smoke(model, name, version, cvdir)
        finally:
            try:
                self.admin.unload(name)
            except TritonAdminError:
                pass
            self.repo.remove_candidate(name)

    # Whole moves ---------------------------------------------------------------------------------
    def go_live(self, model: str, version: int, previous: int | None) -> None:
        """Candidate check, then switch the live config to `version`; on failure restore. Raises AgentError."""
        old_config = self.repo.read_config(model)
        switched = False
        try:
            self.candidate_check(model, version)
            self.repo.write_live_config(model, version)
            switched = True
            self._load(model, f"{model} v{version}")
            self._wait_ready(model, version, f"{model} v{version}")
            try:
                self.smoke(model, model, version, self.repo.version_dir(model, version))
            except AgentError as e:
                raise AgentError(FailureKind.SMOKE, f"{e} (after going live)") from None
        except AgentError as e:
            reason = str(e)
            if switched:
                reason += self.restore(model, old_config)
            if version != previous and e.kind != FailureKind.UNREACHABLE:
                self.repo.remove_version(model, version)
            raise AgentError(e.kind, reason) from None
        log.info("%s v%d is live (was %s)", model, version, f"v{previous}" if previous else "nothing")

    def adopt(self, model: str, version: int) -> None:
        """The live config names `version` already (prepared before Triton started, or an agent
        restart): load it if Triton has not, then smoke it. Raises AgentError."""
        if version not in self.admin.ready_versions(model):
            self._load(model, f"{model} v{version}")
            self._wait_ready(model, version, f"{model} v{version}")
        self.smoke(model, model, version, self.repo.version_dir(model, version))

    def restore(self, model: str, old_config: str | None) -> str:
        try:
            self.repo.restore_config(model, old_config)
            if old_config is not None:
                self.admin.load(model)
                return "; the previous version was reloaded and keeps serving"
            self.admin.unload(model)
            return "; there was no previous version, the model was unloaded"
        except TritonAdminError as e:
            return f"; restoring the previous version failed too: {e}"
