"""What can go wrong while moving one model to its target, as one error with a kind."""
from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    VERIFY = "verify"            # the published files do not match their manifest (or it is damaged)
    LOAD = "load"                # Triton refused the version or it never became ready
    SMOKE = "smoke"              # it loaded but answered wrongly
    UNREACHABLE = "unreachable"  # S3 or Triton did not answer: nothing changed, retried next pass
    UNPUBLISHED = "unpublished"  # the target has no manifest (yet): retried next pass
    MANIFEST = "manifest"        # the target's manifest in S3 is damaged: retried next pass (it may be restored)
    REJECTED = "rejected"        # the desired state rejects the version: never loaded


# Failures of the version itself: retrying the same immutable version cannot succeed.
PERMANENT = frozenset({FailureKind.VERIFY, FailureKind.LOAD, FailureKind.SMOKE})


class AgentError(RuntimeError):
    def __init__(self, kind: str, message: str):
        self.kind = FailureKind(kind)
        super().__init__(message)

    @property
    def permanent(self) -> bool:
        return self.kind in PERMANENT
