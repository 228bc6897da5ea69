"""Phases and reasons of a rollout (one module so that control/rollout/analysis.py and
control/rollout/phases.py share them without importing each other)."""
from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    IDLE = "idle"                # no rollout: every instance serves stable
    PUBLISHED = "published"      # a new version is to roll out; the canary instances are being chosen
    CANARY = "canary"            # the canary instances load the new version
    ANALYSIS = "analysis"        # the canary is compared with the stable instances of its site
    PROMOTING = "promoting"      # the other instances reload in waves of at most `wave_size`
    DONE = "done"                # stable = the new version
    ROLLED_BACK = "rolled_back"  # the new version is rejected; every instance serves stable
    STOPPED = "stopped"          # could not finish in time; the canary is withdrawn, the version NOT rejected


ACTIVE = frozenset({Phase.PUBLISHED, Phase.CANARY, Phase.ANALYSIS, Phase.PROMOTING})
TERMINAL = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.STOPPED})


class Reason(StrEnum):
    # how a rollout starts
    PUBLISHED = "published"                  # a newer version appeared in the mirror (start_on_publish)
    OPERATOR_START = "operator_start"
    FIRST_VERSION = "first_version"          # no stable version to compare with: straight to waves
    # canary
    CANARY_CHOSEN = "canary_chosen"
    CANARY_LIVE = "canary_live"
    LOAD_FAILED = "load_failed"              # an agent reports the new version failed to load
    # analysis checks
    CHECK_PASSED = "check_passed"
    ERROR_RATE = "error_rate"                # failed check: error ratio above the site's stable + delta
    LATENCY = "latency"                      # failed check: p99 above ratio x the site's stable p99
    NOT_ENOUGH_TRAFFIC = "not_enough_traffic"  # no judgement: fewer than min_requests on a side
    NO_BASELINE = "no_baseline"              # no judgement: no stable instance in the canary's site
    CANARY_NOT_REPORTING = "canary_not_reporting"  # no judgement: no metrics from a canary instance
    ANALYSIS_PASSED = "analysis_passed"
    # promotion
    WAVE = "wave"
    PROMOTED = "promoted"
    SUPERSEDED = "superseded"                # someone set stable to the rollout's version by hand
    # deadlines (progress_deadline_s)
    AGENT_NOT_REPORTING = "agent_not_reporting"  # an instance's agent status is missing or stale
    NOT_LIVE_IN_TIME = "not_live_in_time"        # the agent reports, but the version never went live
    SKIPPED_UNREACHABLE = "skipped_unreachable"  # on_unreachable=skip: going on without it
    # operator
    OPERATOR_PAUSE = "operator_pause"
    OPERATOR_RESUME = "operator_resume"
    OPERATOR_PROMOTE = "operator_promote"
    OPERATOR_ABORT = "operator_abort"
    OPERATOR_ROLLBACK = "operator_rollback"
