"""Active/standby control planes across sites: a leader lease in the S3 mirror (docs/leader.md).

  lease.py    the pure decision: (now, lease read, own view, config) -> acquire/renew/hold/follow/step down
  store.py    the lease object in S3, conditional writes only
  elector.py  the thread that renews, holds `is_leader` and `generation`, and records every change
  gate.py     what the daemon's jobs ask before they act
  audit.py    the `leader_transitions` table
"""
