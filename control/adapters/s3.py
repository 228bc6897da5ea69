"""A thin boto3 adapter for the model mirror: one client built from `S3Config` (endpoint, region,
credentials, retries with backoff), the server-side encryption arguments every write carries,
key building under the configured prefix, and errors that say what to do.

Credentials come from the config's SecretStr fields and never reach a log line or an error.
"""
from __future__ import annotations

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from control.mirror.manifest import (
    validate_model_name,
    validate_relpath,
    validate_version,
)

MB = 1024 * 1024


class S3Error(RuntimeError):
    """S3 refused or failed an operation; the message names the bucket/key and what to do."""


class S3Unreachable(S3Error):
    """The endpoint did not answer (after botocore's retries)."""


class PreconditionFailed(S3Error):
    """A conditional write lost (If-None-Match / If-Match)."""


NETWORK_ERRORS = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                  botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)


def make_client(s3cfg, connect_timeout: float = 3.0, read_timeout: float = 30.0):
    """boto3 S3 client from the config: standard retry mode with `retry_attempts` attempts
    (exponential backoff with jitter, done by botocore)."""
    cfg = Config(
        retries={"max_attempts": max(1, s3cfg.retry_attempts), "mode": "standard"},
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        s3={"addressing_style": "path"},
        # Checksums only where S3 requires them: S3-compatible stores (and moto) differ here.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3", endpoint_url=s3cfg.url, region_name=s3cfg.region, config=cfg,
        aws_access_key_id=s3cfg.access_key_id.get_secret_value(),
        aws_secret_access_key=s3cfg.secret_access_key.get_secret_value(),
    )


def sse_args(s3cfg) -> dict:
    """ExtraArgs for every put/upload/copy: SSE-S3 (AES256) or SSE-KMS with the configured key."""
    if s3cfg.sse == "aws:kms":
        args = {"ServerSideEncryption": "aws:kms"}
        if s3cfg.kms_key_id:
            args["SSEKMSKeyId"] = s3cfg.kms_key_id
        return args
    return {"ServerSideEncryption": "AES256"}


def transfer_config(s3cfg) -> TransferConfig:
    threshold = max(5, s3cfg.multipart_threshold_mb) * MB
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold, max_concurrency=4)


def model_prefix(s3cfg, model: str) -> str:
    validate_model_name(model)
    return f"{s3cfg.prefix}/{model}/" if s3cfg.prefix else f"{model}/"


def version_prefix(s3cfg, model: str, version: int) -> str:
    return f"{model_prefix(s3cfg, model)}{validate_version(version)}/"


def object_key(s3cfg, model: str, version: int, relpath: str) -> str:
    """The key of one file of a version; the path is validated so no key escapes its version."""
    return version_prefix(s3cfg, model, version) + validate_relpath(relpath, f"object key for {model}/{version}")


def describe(err: Exception, bucket: str, key: str = "") -> S3Error:
    """Turn a botocore error into an S3Error that names the object and what to do."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(err, NETWORK_ERRORS):
        return S3Unreachable(f"{where}: the S3 endpoint did not answer ({type(err).__name__}); check that it runs "
                             "and that s3.endpoint_url/host/port are right. Instances keep serving what they have")
    if isinstance(err, botocore.exceptions.ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return PreconditionFailed(f"{where}: already exists (a conditional write lost)")
        if code in ("NoSuchBucket",):
            return S3Error(f"{where}: the bucket does not exist; run `triton-hybrid up` or create it")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Error(f"{where}: access denied ({code}); check the S3 credentials in the config/env")
        return S3Error(f"{where}: {code or status}: {err.response.get('Error', {}).get('Message', '')}")
    return S3Error(f"{where}: {type(err).__name__}: {err}")


def error_code(err: Exception) -> str:
    """S3's error code of a botocore ClientError ("NoSuchKey", "304", ...); "" for anything else."""
    if isinstance(err, botocore.exceptions.ClientError):
        return err.response.get("Error", {}).get("Code", "")
    return ""


def is_not_found(err: Exception) -> bool:
    return error_code(err) in ("404", "NoSuchKey", "NotFound")


def ensure_bucket(client, s3cfg) -> None:
    """Create the bucket if it does not exist (idempotent)."""
    try:
        client.head_bucket(Bucket=s3cfg.bucket)
        return
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise describe(e, s3cfg.bucket) from None
    except NETWORK_ERRORS as e:
        raise describe(e, s3cfg.bucket) from None
    try:
        kw = {"Bucket": s3cfg.bucket}
        if s3cfg.region and s3cfg.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": s3cfg.region}
        client.create_bucket(**kw)
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise describe(e, s3cfg.bucket) from None


def get_bytes(client, bucket: str, key: str) -> bytes | None:
    """The object's body, or None when it does not exist."""
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:  # noqa: BLE001 - classified below
        if is_not_found(e):
            return None
        raise describe(e, bucket, key) from None


def head(client, bucket: str, key: str) -> dict | None:
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        if is_not_found(e):
            return None
        raise describe(e, bucket, key) from None


def list_prefixes(client, bucket: str, prefix: str) -> list[str]:
    """The 'sub-directories' one level below prefix (names without the trailing '/')."""
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                out.append(cp["Prefix"][len(prefix):].rstrip("/"))
    except Exception as e:  # noqa: BLE001
        raise describe(e, bucket, prefix) from None
    return out


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
    except Exception as e:  # noqa: BLE001
        raise describe(e, bucket, prefix) from None
    return out


def delete_keys(client, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        batch = keys[i:i + 1000]
        try:
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except Exception as e:  # noqa: BLE001
            raise describe(e, bucket, batch[0]) from None
