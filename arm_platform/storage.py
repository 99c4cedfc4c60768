"""URI helpers for local folders and S3 (``s3://bucket/key``): the only module that imports boto3.

S3 settings come from the standard AWS environment: credentials from the default chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, profiles, instance roles), the endpoint of an S3-compatible store from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, the region from AWS_REGION / AWS_DEFAULT_REGION. Keys are never logged or passed explicitly.
Writes are atomic: a temp file renamed into place locally, a single complete PUT on S3.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from arm_platform import security

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_BACKOFF_S = 0.5
"""First wait between attempts of `retry`; doubles each attempt."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with "/" (leading / trailing "/" of each part dropped).

    ValueError when the result would lie outside `uri` ("..", or any "." / ".." segment on S3): names and manifest
    entries come from users and files, and must never reach a sibling folder (`security.safe_join`).
    """
    return security.safe_join(uri, *parts)


def split_s3(uri: str) -> tuple[str, str]:
    """("bucket", "key/inside") of "s3://bucket/key/inside"; ValueError if it is no S3 URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_endpoint() -> str | None:
    """Endpoint URL of an S3-compatible store from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI (what Ray Data's readers take)."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    kwargs: dict[str, object] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if _region():
        kwargs["region"] = _region()
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


@functools.cache
def _s3_client(endpoint: str | None, region: str | None):  # noqa: ANN202 (botocore client type is dynamic)
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def reset_clients() -> None:
    """Forget cached clients (call in forked worker processes: connection pools must not cross a fork)."""
    _s3_client.cache_clear()


def s3_client():  # noqa: ANN201
    """A cached boto3 S3 client for the current environment's endpoint / region."""
    return _s3_client(s3_endpoint(), _region())


def _s3_error(uri: str, err: Exception) -> Exception:
    """Translate a botocore error into FileNotFoundError / ConnectionError / OSError naming the URI."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return FileNotFoundError(f"{uri} does not exist ({code})")
        return OSError(f"S3 request for {uri} failed: {code or err}")
    if isinstance(err, EndpointConnectionError):
        return ConnectionError(f"cannot reach the S3 endpoint {s3_endpoint() or 'AWS'} for {uri}: {err}")
    return OSError(f"S3 request for {uri} failed: {err}")


def _s3_call(uri: str, fn: Callable[[], T]) -> T:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except (ClientError, BotoCoreError) as err:
        raise _s3_error(uri, err) from err


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so readers see either no object or the complete one."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    folder = os.path.dirname(os.path.abspath(uri))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(uri))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_bytes(uri: str) -> bytes:
    """Whole object / file; FileNotFoundError naming the URI when absent."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def read_tail(uri: str, length: int) -> tuple[bytes, int]:
    """(last `length` bytes, total size) of a file / object in one request (an S3 suffix range GET)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, lambda: _s3_tail(bucket, key, length))
    try:
        with open(uri, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            f.seek(max(total - length, 0))
            return f.read(), total
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def sha256(uri: str, chunk_size: int = 8 << 20) -> str:
    """Hex sha256 of a file / object, streamed in `chunk_size` pieces (shards can be larger than memory allows)."""
    digest = hashlib.sha256()
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def stream() -> None:
            for chunk in s3_client().get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(chunk_size):
                digest.update(chunk)

        _s3_call(uri, stream)
        return digest.hexdigest()
    try:
        with open(uri, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err
    return digest.hexdigest()


def _s3_tail(bucket: str, key: str, length: int) -> tuple[bytes, int]:
    from botocore.exceptions import ClientError

    try:
        response = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=-{length}")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "InvalidRange":  # an empty object has no suffix range
            raise
        return b"", int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    data = response["Body"].read()
    content_range = response.get("ContentRange") or ""
    return data, int(content_range.rsplit("/", 1)[1]) if "/" in content_range else len(data)


def exists(uri: str) -> bool:
    """True if the file / object exists; ConnectionError / OSError naming the URI if the store cannot answer."""
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    try:
        _s3_call(uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))
    except FileNotFoundError:
        return False
    return True


def list_files(uri: str) -> Iterator[str]:
    """URIs of all files below a folder / prefix (recursive), in no particular order."""
    if is_s3(uri):
        bucket, prefix = split_s3(join(uri, ""))
        paginator = s3_client().get_paginator("list_objects_v2")
        pages = _s3_call(uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"
        return
    for root, _, names in os.walk(uri):
        for name in names:
            yield os.path.join(root, name)


def retry(fn: Callable[[], T], what: str, attempts: int) -> T:
    """Call `fn` up to `attempts` times with exponential backoff on OSError (includes FileNotFoundError).

    The last error is re-raised with `what` (a URI) in its message.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as err:
            if attempt == attempts - 1:
                raise type(err)(f"{what}: giving up after {attempts} attempts: {err}") from err
            wait = _RETRY_BACKOFF_S * 2**attempt
            logger.warning("%s failed (%s); retrying in %.1fs", what, err, wait)
            time.sleep(wait)
    raise ValueError(f"attempts must be >= 1, got {attempts}")
