"""Paths and URIs: one way to read and write local folders and object storage.

Every place that accepts a path accepts ``s3://bucket/key`` as well. Credentials come
only from the standard AWS chain (environment, ~/.aws, instance profile); an
S3-compatible endpoint is taken from ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import botocore.exceptions
import fsspec
import pyarrow.fs

_SUPPORTED = ("file", "s3")
# what a mistyped URI looks like as a local path: "s3//bucket", "s3:/bucket", "s3:bucket"
_MISTYPED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)(//|:/?)(?!/)")
_KNOWN_SCHEMES = ("s3", "s3a", "gs", "gcs", "hdfs", "abfs", "az", "http", "https", "file")


class StorageError(OSError):
    """A read or write the storage refused or could not do (endpoint unreachable, disk
    full, ...), with the URI it was for and what to do. An OSError, so that whatever
    handles OSError handles it too."""


# s3fs passes botocore's connection errors through; they are not OSErrors
_FAILURES = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Connection refused", "Connection reset",
                "Connection was closed")


def storage_error(action: str, uri: str, err: BaseException) -> StorageError:
    """``err`` of ``action`` on ``uri`` as a StorageError that names both and the fix."""
    text, code = str(err) or type(err).__name__, getattr(err, "errno", None)
    if code == errno.ENOSPC or "No space left" in text:  # pyarrow's OSErrors carry no errno
        code = errno.ENOSPC
        hint = ("the disk is full: free space there or choose another output, then run the same "
                "command again (finished work is kept)")
    elif isinstance(err, botocore.exceptions.EndpointConnectionError) or any(m in text for m in _UNREACHABLE):
        hint = ("the storage is unreachable: check the network and AWS_ENDPOINT_URL, then run the "
                "same command again (finished work is kept)")
    else:
        hint = "check the storage and run the same command again (finished work is kept)"
    failure = StorageError(f"{action} {uri} failed: {text}; {hint}")
    failure.uri = uri  # (not .filename: OSError would print it instead of the message)
    failure.errno = code
    return failure


@contextmanager
def failures_named(action: str, uri: str) -> Iterator[None]:
    """Storage failures inside the block raised as a StorageError naming ``uri``; a
    missing file stays a FileNotFoundError (callers test for it)."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except _FAILURES as err:
        raise storage_error(action, uri, err) from err


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def check_uri(uri: str) -> str:
    """Validate a path or URI early, with a message that says what is accepted."""
    if not uri:
        raise ValueError("empty path: give a local folder or an s3://bucket/prefix URI")
    s = scheme(uri)
    typo = _MISTYPED.match(uri) if s == "file" else None
    if typo and typo[1].lower() in _KNOWN_SCHEMES and not os.path.exists(uri):
        raise ValueError(
            f"{uri!r} looks like a mistyped URI ({typo[1]}{typo[2]} instead of {typo[1]}://): write "
            f"{typo[1].lower()}://{uri[typo.end():]} for object storage, or ./{uri} for a local folder"
        )
    if s not in _SUPPORTED:
        raise ValueError(
            f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix"
        )
    if s == "s3" and not uri[len("s3://"):].strip("/"):
        raise ValueError(f"storage URI {uri!r} names no bucket: use s3://bucket/prefix")
    return uri


def check_fields(obj, *keys: str) -> None:
    """``check_uri`` of a config object's path fields (None passes); the error names the key."""
    for key in keys:
        if getattr(obj, key) is not None:
            try:
                check_uri(getattr(obj, key))
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None


def absolute(uri: str | None) -> str | None:
    """Local paths made absolute (Ray workers do not share the driver's working
    directory); URIs and None unchanged."""
    if uri is None or scheme(uri) != "file":
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if scheme(base) == "file":
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def _fs_kwargs(uri: str) -> dict:
    if scheme(uri) == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        return {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the path inside it."""
    check_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri, **_fs_kwargs(uri))
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow filesystem and the path inside it (for Parquet and Ray)."""
    check_uri(uri)
    if scheme(uri) == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pyarrow.fs.S3FileSystem(**kwargs), uri[len("s3://"):]
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri)


def open_file(uri: str, mode: str = "rb") -> IO:
    fs, path = filesystem(uri)
    if "w" in mode and scheme(uri) == "file":
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return fs.open(path, mode)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with failures_named("checking", uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    with failures_named("reading", uri), open_file(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """All of ``data`` or nothing at ``uri``: a local file is written under a temporary
    name and renamed (a full disk leaves no half file); an object PUT is atomic."""
    with failures_named("writing", uri):
        if scheme(uri) != "file":
            with open_file(uri, "wb") as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(os.path.abspath(uri)) or ".", exist_ok=True)
        temporary = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, uri)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
