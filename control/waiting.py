"""One way to wait for a condition: `wait_until(predicate, timeout, what)`.

Every deadline loop of the project (a component becoming ready, a weight being applied, a test
waiting for a metric) goes through here, so a timeout always says what was awaited and for how long.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    def __init__(self, what: str, timeout: float, last: object = None):
        self.what, self.timeout, self.last = what, timeout, last
        detail = f" (last: {last})" if last is not None else ""
        super().__init__(f"timed out after {timeout:g}s waiting for {what}{detail}")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1,
               abort: Callable[[], str | None] | None = None, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `predicate()` until it returns a truthy value, and return that value.

    An exception from `predicate` counts as "not yet" (a server still starting refuses connections);
    the last one is named in the timeout. `abort()` returning a message stops the wait at once with
    that message (e.g. the process being awaited has exited).
    """
    deadline = clock() + timeout
    last: object = None
    while True:
        if abort is not None:
            why = abort()
            if why:
                raise RuntimeError(f"gave up waiting for {what}: {why}")
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - not ready yet; keep the reason for the timeout message
            last = f"{type(e).__name__}: {e}"
        if clock() >= deadline:
            raise WaitTimeout(what, timeout, last)
        sleep(interval)
