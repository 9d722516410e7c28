"""Where licensing data lives: a local directory or an `s3://bucket/prefix`, written append-only and durably.

Every write is whole-object, atomic and no-clobber: a local file is written to a temporary name, fsynced, hard-linked
into place (which fails if the name exists) and its directory fsynced, as is the parent of every directory a write
creates; an S3 object exists only once PutObject has returned (S3 stores it durably before
answering). `put` returns only after that point, which is what "acknowledged" means in ingest and the tracker.
Objects are never rewritten: names are deterministic per (source, offsets), so a retry after a crash finds the
object there already and leaves it alone.

The location comes from `HERD_LICENSING_STORE` or the config (default `./herd-data/licensing`); S3 endpoints from
`endpoint_url`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (boto3 reads those itself too).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

STORE_ENV = "HERD_LICENSING_STORE"
DEFAULT_STORE = "./herd-data/licensing"


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit one, else the AWS_* environment, else AWS itself (None)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """A directory; durable atomic writes via temp file + fsync + rename + directory fsync."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def put(self, path: str, data: bytes) -> bool:
        """Write `data` at `path` unless it exists; durable on return. True if this call wrote it."""
        final = self.root / path
        if final.exists():
            return False
        self._make_dirs(final.parent)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            # A hard link fails if `final` exists, atomically: two writers racing for one name cannot both win
            # (exists-then-rename could let the second silently replace the first).
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        _fsync_dir(final.parent)
        return True

    @staticmethod
    def _make_dirs(folder: Path) -> None:
        """mkdir -p, fsyncing the parent of every directory it creates (else a crash can forget the directory,
        and with it every file already acknowledged inside)."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    def get(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def exists(self, path: str) -> bool:
        return (self.root / path).exists()

    def list(self, prefix: str) -> list[str]:
        """Paths (relative to the root, '/'-separated) of the complete objects under `prefix`, sorted."""
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def ray_paths(self, paths: list[str]) -> tuple[list[str], object]:
        """Absolute paths and the pyarrow filesystem Ray Data should read them with."""
        return [str(self.root / p) for p in paths], None


class S3Store:
    """An `s3://bucket/prefix`, through boto3; PutObject with If-None-Match keeps objects append-only."""

    def __init__(self, uri: str, endpoint_url: str | None = None, timeout_s: float = 30.0):
        from common.s3url import parse_s3_url

        self.bucket, self.prefix = parse_s3_url(uri, field="store")
        self.uri = uri
        self.endpoint_url = s3_endpoint(endpoint_url)
        self.timeout_s = timeout_s  # per connect and per read: a hung store fails a flush, it does not hang it
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=Config(
                connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                retries={"max_attempts": 3, "mode": "standard"}))
        return self._client

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def put(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:  # 412: an earlier attempt already stored this object; keep it
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise

    def get(self, path: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(path))
            return True
        except ClientError:
            return False

    def list(self, prefix: str) -> list[str]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._key(prefix)):
            out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(out)

    def ray_paths(self, paths: list[str]) -> tuple[list[str], object]:
        return [f"{self.bucket}/{self._key(p)}" for p in paths], pyarrow_s3(self.endpoint_url)


def pyarrow_s3(endpoint_url: str | None = None):
    """A pyarrow S3 filesystem for the same endpoint boto3 uses (for reading logs and for Ray Data)."""
    from pyarrow import fs

    endpoint = s3_endpoint(endpoint_url)
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return fs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **kwargs)


def open_store(uri: str | None = None, endpoint_url: str | None = None):
    """The store at `uri`, else `HERD_LICENSING_STORE`, else ./herd-data/licensing."""
    uri = uri or os.environ.get(STORE_ENV) or DEFAULT_STORE
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url)
    if "://" in uri:
        from common.errors import UserError

        raise UserError(f"store {uri!r}: only a local directory or s3://bucket/prefix is supported")
    return LocalStore(uri)
