"""The lease object in the S3 mirror: `<prefix>/_control/leader.json`, next to the desired state.

Written only conditionally: If-None-Match: * to create it, If-Match on the ETag that was read to
renew or take over it; a lost race is a PreconditionFailed (s3x), never an overwrite. The body
carries its sha256 in the object's metadata (as the desired state does) and is checked on read.
No policy here: control/leader/lease.py decides.
"""
from __future__ import annotations

import hashlib

from pydantic import ValidationError

from control.adapters import s3 as s3x
from control.leader.lease import LeaseRead, LeaseRecord
from control.mirror.desired import control_key

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
        self.bucket = s3cfg.bucket
        self.key = control_key(s3cfg, LEASE_NAME)

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def read(self) -> LeaseRead:
        """The lease and its ETag (record None: no lease object). Raises s3x.S3Error (unreachable,
        denied) or LeaseError (damaged)."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = obj["Body"].read()
        except Exception as e:  # noqa: BLE001 - classified below
            if s3x.is_not_found(e):
                return LeaseRead(None, None)
            raise s3x.describe(e, self.bucket, self.key) from None
        if obj.get("Metadata", {}).get("sha256") != hashlib.sha256(body).hexdigest():
            raise LeaseError(f"{self.where}: sha256 of the body does not match its metadata: damaged or not written "
                             "by triton-hybrid. No control plane takes over until it is deleted "
                             f"(`aws s3 rm {self.where}`); the next one up then acquires it")
        try:
            return LeaseRead(LeaseRecord.model_validate_json(body), obj["ETag"])
        except ValidationError as e:
            raise LeaseError(f"{self.where}: not a lease: {e.errors()[0]['msg']}; delete it to let a control plane "
                             "acquire a new one") from None

    def write(self, record: LeaseRecord, etag: str | None) -> str:
        """Write `record` if the lease is still at `etag` (None: only if there is none); the new ETag.
        Raises s3x.PreconditionFailed when another writer got there first."""
        body = record.model_dump_json().encode()
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json",
                                       Metadata={"sha256": hashlib.sha256(body).hexdigest()}, **cond,
                                       **s3x.sse_args(self.s3cfg))
        except Exception as e:  # noqa: BLE001
            raise s3x.describe(e, self.bucket, self.key) from None
        return r["ETag"]
