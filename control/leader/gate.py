"""The one gate between the control plane's jobs and what they change: `acting()` says whether this
daemon may act now (always, when leader election is off), `fencing_token()` gives the generation
that every desired-state write carries, and refuses (NotLeader) when this daemon does not lead, so a
lease lost in the middle of a rollout tick stops the writes that were still to come."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: the elector imports the stores that import NotLeader from here
    from control.leader.elector import Elector


class NotLeader(RuntimeError):
    """This control plane is standby: it must not act. The message names the leader."""


class Gate:
    def __init__(self, elector: Elector | None = None):
        self.elector = elector

    @property
    def enabled(self) -> bool:
        return self.elector is not None

    def acting(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def fencing_token(self) -> int:
        """The lease generation to write with (0 with election off); NotLeader when standby."""
        if self.elector is None:
            return 0
        if not self.elector.is_leader:
            raise NotLeader(self.refusal())
        return self.elector.generation

    def acting_generation(self) -> int | None:
        """The generation this daemon acts under now (0 with election off); None when standby."""
        try:
            return self.fencing_token()
        except NotLeader:
            return None

    def refusal(self) -> str:
        """Why this daemon does not act, naming the leader (for logs and the admin API's 409)."""
        st = self.elector.status() if self.elector is not None else {}
        leader = st.get("leader")
        where = f"the leader is {leader}" if leader else "no control plane leads right now"
        return f"this control plane ({st.get('name')}@{st.get('site')}) is standby; {where}: send changes there"

    def status(self) -> dict:
        return {"enabled": False, "role": "leader", "is_leader": True} if self.elector is None else self.elector.status()
