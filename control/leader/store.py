"""The lease object in the S3 mirror: `<prefix>/_control/leader.json`, next to the desired state.

Written only conditionally: If-None-Match: * to create it, If-Match on the ETag that was read to
renew or take over it; a lost race is a PreconditionFailed (s3x), never an overwrite. The body
carries its sha256 in the object's metadata and is checked on read: the same lower level as every
control object (control/mirror/desired.CheckedObjects), through the lease's own short-timeout client.
No policy here: control/leader/lease.py decides.
"""
from __future__ import annotations

from pydantic import ValidationError

from control.adapters import s3 as s3x
from control.leader.lease import LeaseRead, LeaseRecord
from control.mirror.desired import CheckedObjects, DamagedObject, control_key

LEASE_NAME = "leader.json"


class LeaseError(s3x.S3Error):
    """The lease object is damaged or not ours; the message names the key and what to do."""


def lease_client(s3cfg, timeout_s: float):
    """An S3 client for lease requests only: short timeouts and no retries (the next round is the
    retry), so a hung endpoint costs one round, never the lease."""
    return s3x.make_client(s3cfg.model_copy(update={"retry_attempts": 1}), connect_timeout=timeout_s,
                           read_timeout=timeout_s)


class LeaseStore:
    def __init__(self, client, s3cfg):
        self.client, self.s3cfg = client, s3cfg
        self.objects = CheckedObjects(client, s3cfg)
        self.bucket = s3cfg.bucket
        self.key = control_key(s3cfg, LEASE_NAME)

    @property
    def where(self) -> str:
        return self.objects.where(self.key)

    def read(self) -> LeaseRead:
        """The lease and its ETag (record None: no lease object). Raises s3x.S3Error (unreachable,
        denied) or LeaseError (damaged)."""
        try:
            got = self.objects.get(self.key)
        except DamagedObject as e:
            raise LeaseError(f"{e}. No control plane takes over until it is deleted (`aws s3 rm {self.where}`); "
                             "the next one up then acquires it") from None
        if got is None:
            return LeaseRead(None, None)
        try:
            return LeaseRead(LeaseRecord.model_validate_json(got.body), got.etag)
        except ValidationError as e:
            raise LeaseError(f"{self.where}: not a lease: {e.errors()[0]['msg']}; delete it to let a control plane "
                             "acquire a new one") from None

    def write(self, record: LeaseRecord, etag: str | None) -> str:
        """Write `record` if the lease is still at `etag` (None: only if there is none); the new ETag.
        Raises s3x.PreconditionFailed when another writer got there first."""
        return self.objects.put_if(self.key, record.model_dump_json().encode(), etag)
