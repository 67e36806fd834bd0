"""The S3 filesystem every stage uses (checkpoints, patch shards, published data).

Imported only where an ``s3://`` path is met: it imports pyarrow.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import pyarrow.fs as pafs

RETRY_ATTEMPTS = 10


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem whose retries survive pickling. pyarrow's own ``__reduce__``
    drops ``retry_strategy``, so every copy Ray sends to a worker, to its controller or to a
    Ray Data read task fell back to 3 quick attempts: a 4-second outage of the store failed
    a checkpoint write after 0.3 s, where the original waited and succeeded."""

    def __init__(self, attempts: int = RETRY_ATTEMPTS, **options: Any) -> None:
        self._options = {"attempts": attempts, **options}
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                         **options)

    def __reduce__(self) -> tuple[Any, tuple]:
        return partial(RetryingS3FileSystem, **self._options), ()


def s3_endpoint(endpoint: str = "") -> str:
    """The S3 endpoint in effect: ``endpoint``, else ``$AWS_ENDPOINT_URL`` ("": AWS)."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL", "")


def s3_filesystem(endpoint: str = "") -> RetryingS3FileSystem:
    """S3 at ``endpoint`` (else ``$AWS_ENDPOINT_URL``) for S3-compatible stores; requests
    time out and are retried with backoff, so a short outage of the store delays a read or
    a checkpoint instead of failing it."""
    endpoint = s3_endpoint(endpoint)
    options: dict[str, Any] = {"connect_timeout": 10, "request_timeout": 30}
    if endpoint:
        options["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            options["scheme"] = "http"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    return RetryingS3FileSystem(**options)


def finalize() -> None:
    """Shut pyarrow's S3 client down before the interpreter does. Left to exit, the AWS
    SDK's threads can outlive it and abort the process after the work is done
    ("terminate called without an active exception", seen once in the batch test's rerun);
    pyarrow's advice (apache/arrow#41087): drop the filesystems, then finalize."""
    import gc

    gc.collect()
    pafs.ensure_s3_finalized()
