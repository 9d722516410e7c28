"""Read a safetensors checkpoint straight from S3 by byte ranges, into a node-local cache.

Nodes of an expert-parallel replica share no filesystem, and each worker needs only its experts' rows of the
fused expert tensors (1/N of most of the bytes). A safetensors file starts with an 8-byte little-endian header
length and a JSON header giving every tensor's dtype, shape and byte offsets, so a worker fetches the header,
then exactly the byte ranges of the tensors (or expert rows) it needs with `GetObject(Range=...)`.

Fetched ranges are written to a cache folder on the node's local disk, one file per range, under a file lock, so
the workers of one node fetch a range once and a restarted worker reads it from disk. The cache is keyed by the
source (endpoint, bucket, prefix) and each object's ETag, so a shard replaced in the bucket is fetched again; a
cached range of the wrong size is fetched again; shard names from index.json must be plain file names (a bucket
writer cannot make a node write outside the cache). Caches live under one private root, `cache_root()`. `S3Checkpoint` offers the
same reading interface as `llama4.checkpoint.CheckpointReader` (`has`, `get`, `get_rows`, `names`), so the
loader does not care where the bytes come from; `bytes_fetched` counts what came over the network.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from llama4.checkpoint import INDEX_FILE, CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files besides the weights that a loader needs on the driver (config, tokenizer, chat template).
_METADATA_SUFFIXES = (".json", ".jinja", ".model", ".txt")


class CacheRootError(RuntimeError):
    """The herd cache root cannot be used safely (not a folder, not ours, writable by other users)."""


def cache_root() -> Path:
    """herd's node-local cache folder: $HERD_CACHE_DIR, else $XDG_CACHE_HOME/herd, else ~/.cache/herd.

    Created private (0700). A root another user could write to (a shared /tmp path, say) is refused: whoever can
    write there could plant the weights a replica loads."""
    env = os.environ.get("HERD_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "herd"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if not root.is_dir():
        raise CacheRootError(f"herd cache root {root} is not a folder; set HERD_CACHE_DIR to a private folder")
    if st.st_uid != os.getuid():
        raise CacheRootError(f"herd cache root {root} belongs to another user (uid {st.st_uid}); set HERD_CACHE_DIR "
                             "to a folder of your own")
    if st.st_mode & 0o022:
        raise CacheRootError(f"herd cache root {root} is writable by other users (mode {st.st_mode & 0o777:o}); "
                             f"run `chmod 700 {root}` or set HERD_CACHE_DIR to a private folder")
    return root


def source_key(url: str, endpoint_url: str | None = None) -> str:
    """A short, file-name-safe key for one checkpoint source (endpoint + s3 URL), for cache folder names."""
    import hashlib

    return hashlib.sha256(f"{endpoint_url or ''}|{url}".encode()).hexdigest()[:24]


def _check_shard_name(shard, url: str) -> str:
    """A shard named in index.json must be a plain file name, so joining it to a folder stays in that folder."""
    ok = (isinstance(shard, str) and shard and "/" not in shard and "\\" not in shard and "\0" not in shard
          and not shard.startswith(".") and shard.endswith(".safetensors") and len(shard) <= 255)
    if not ok:
        raise CheckpointError(f"{url}/{INDEX_FILE}: weight_map names the shard {str(shard)[:80]!r}; shard names must be "
                              "plain '*.safetensors' file names in the checkpoint's folder")
    return shard


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix") with no trailing slash; a bad URL is an
    `S3UrlError` (a ValueError) naming the checkpoint path."""
    from common.s3url import parse_s3_url as parse

    return parse(url, field="checkpoint path")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie inside its safetensors file (absolute offsets)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # first byte, absolute within the file
    end: int  # one past the last byte

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // self.shape[0] if self.shape and self.shape[0] else 0


class S3Checkpoint:
    """A Llama 4 checkpoint under `s3://bucket/prefix`, read by byte range with a node-local disk cache.

    `endpoint_url` points boto3 at an S3-compatible server (MinIO, moto); credentials come from the usual
    AWS environment. `bytes_fetched` counts bytes received from S3 (cache hits add nothing).
    """

    def __init__(self, url: str, cache_dir: str | Path, endpoint_url: str | None = None):
        import boto3

        self.url = url
        self.path = url  # what CheckpointReader's callers print in messages
        self.bucket, self.prefix_key = parse_s3_url(url)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url)
        self.bytes_fetched = 0
        self.weight_map: dict[str, str] = json.loads(self._read_object(INDEX_FILE))["weight_map"]
        for shard in set(self.weight_map.values()):
            _check_shard_name(shard, url)
        self._source = source_key(url, endpoint_url)
        self._etags: dict[str, tuple[str, int]] = {}
        self.prefix = "language_model." if any(k.startswith("language_model.") for k in self.weight_map) else ""
        self._headers: dict[str, dict[str, TensorEntry]] = {}

    # ---- reading interface shared with CheckpointReader --------------------------------------------------
    def full_name(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.full_name(name) in self.weight_map

    def names(self) -> Iterator[str]:
        """Text-model tensor names (vision tensors excluded)."""
        for full in self.weight_map:
            if not self.prefix or full.startswith(self.prefix):
                yield full[len(self.prefix):]

    def entry(self, name: str) -> TensorEntry:
        """The file, dtype, shape and byte range of a tensor (fetches that file's header once)."""
        full = self.full_name(name)
        if full not in self.weight_map:
            raise CheckpointError(f"tensor {full!r} is missing from {self.url}")
        return self._header(self.weight_map[full])[full]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entry(name).shape)

    def get_raw(self, full_name: str) -> torch.Tensor:
        """A tensor by its name in the files (e.g. `vision_model.*`, which has no text-model name)."""
        if full_name not in self.weight_map:
            raise CheckpointError(f"tensor {full_name!r} is missing from {self.url}")
        e = self._header(self.weight_map[full_name])[full_name]
        return _to_tensor(self._range(e.file, e.start, e.end), e.dtype, e.shape)

    def get(self, name: str) -> torch.Tensor:
        """A whole tensor, fetching only its bytes."""
        e = self.entry(name)
        return _to_tensor(self._range(e.file, e.start, e.end), e.dtype, e.shape)

    def get_rows(self, name: str, index: list[int] | range) -> torch.Tensor:
        """Rows `index` of the first dimension (experts of a fused tensor), one range per contiguous run."""
        e = self.entry(name)
        idx = list(index)
        parts = [self._range(e.file, e.start + a * e.row_bytes, e.start + (b + 1) * e.row_bytes)
                 for a, b in _runs(idx)]
        return _to_tensor(b"".join(parts), e.dtype, (len(idx), *e.shape[1:]))

    def close(self) -> None:
        self._headers.clear()

    # ---- driver side: the small files a loader reads from a folder ---------------------------------------
    def download_metadata(self, dest: str | Path) -> Path:
        """Copy config, index and tokenizer files (not weights) into `dest`; returns it."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(""))
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self._key("")):]
                if rel.endswith(_METADATA_SUFFIXES) and "/" not in rel:
                    (dest / rel).write_bytes(self._read_object(rel))
        return dest

    def download_all(self, dest: str | Path) -> Path:
        """The whole checkpoint (metadata and every weight shard) as a local folder at `dest`; returns it.

        For a single worker, which needs every tensor anyway: one plain GET per shard, written to a temporary
        name and renamed, so a folder interrupted mid-download is completed by the next call, never half-read.
        """
        dest = self.download_metadata(dest)
        stamps = dest.with_name(dest.name + ".etags")  # beside the folder: the checkpoint folder stays as released
        stamps.mkdir(exist_ok=True)
        for shard in sorted(set(self.weight_map.values())):
            target = dest / _check_shard_name(shard, self.url)
            etag, size = self._object_version(shard)
            stamp = stamps / shard  # the ETag the local copy was made from: a replaced shard is fetched again
            if target.exists() and target.stat().st_size == size and stamp.exists() and stamp.read_text() == etag:
                continue
            tmp = target.with_suffix(".partial")
            data = self._read_object(shard)
            if len(data) != size:
                raise CheckpointError(f"s3://{self.bucket}/{self._key(shard)}: read {len(data)} bytes, the object "
                                      f"has {size}")
            tmp.write_bytes(data)
            tmp.replace(target)
            stamp.write_text(etag)
        return dest

    # ---- bytes ---------------------------------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        return f"{self.prefix_key}/{rel}" if self.prefix_key else rel

    def _read_object(self, rel: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as err:
            raise CheckpointError(f"cannot read s3://{self.bucket}/{self._key(rel)}: {err}") from None
        self.bytes_fetched += len(body)
        return body

    def _header(self, file: str) -> dict[str, TensorEntry]:
        if file not in self._headers:
            (n,) = struct.unpack("<Q", self._range(file, 0, 8))
            header = json.loads(self._range(file, 8, 8 + n))
            base = 8 + n
            self._headers[file] = {
                name: TensorEntry(file, _DTYPES[v["dtype"]], tuple(v["shape"]),
                                  base + v["data_offsets"][0], base + v["data_offsets"][1])
                for name, v in header.items() if name != "__metadata__"
            }
        return self._headers[file]

    def _object_version(self, file: str) -> tuple[str, int]:
        """(ETag, size) of one object, asked once per reader: the cache key of its bytes."""
        if file not in self._etags:
            from botocore.exceptions import ClientError

            try:
                head = self._s3.head_object(Bucket=self.bucket, Key=self._key(file))
            except ClientError as err:
                raise CheckpointError(f"cannot read s3://{self.bucket}/{self._key(file)}: {err}") from None
            etag = "".join(c for c in head.get("ETag", "") if c.isalnum())[:64] or "none"
            self._etags[file] = (etag, int(head["ContentLength"]))
        return self._etags[file]

    def _cached(self, path: Path, size: int) -> bytes | None:
        if path.exists():
            data = path.read_bytes()
            if len(data) == size:
                return data
        return None

    def _range(self, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file: from the node-local cache, else fetched once under a lock."""
        if end <= start:
            return b""
        etag, _ = self._object_version(_check_shard_name(file, self.url))
        path = self.cache_dir / self._source / f"{file}@{etag}" / f"{start}-{end}"
        data = self._cached(path, end - start)
        if data is not None:
            return data
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker of this node may be fetching the same range
            data = self._cached(path, end - start)
            if data is not None:
                return data
            resp = self._s3.get_object(Bucket=self.bucket, Key=self._key(file), Range=f"bytes={start}-{end - 1}")
            data = resp["Body"].read()
            if len(data) != end - start:
                raise CheckpointError(f"s3://{self.bucket}/{self._key(file)}: asked for {end - start} bytes at "
                                      f"{start}, got {len(data)}; the object is shorter than its header says")
            self.bytes_fetched += len(data)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return data


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted-or-not indices, in the given order: [3,4,5,9] -> [(3,5),(9,9)]."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _to_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def upload_checkpoint(folder: str | Path, url: str, endpoint_url: str | None = None) -> list[str]:
    """Upload a checkpoint folder's files to `s3://bucket/prefix` (the bucket must exist); returns the keys."""
    import boto3

    bucket, prefix = parse_s3_url(url)
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    keys = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            key = f"{prefix}/{p.name}" if prefix else p.name
            s3.upload_file(str(p), bucket, key)
            keys.append(key)
    return keys
