"""Local paths and `s3://` URIs behind one interface, through pyarrow's filesystems (S3 endpoint overridable).

Used for the base checkpoint (fetched once per node into a cache), the dataset (Ray Data reads it through the
filesystem returned here), Ray Train's storage_path and the job's outputs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from common.s3url import is_s3_url, parse_s3_url
from finetune.schema import S3Settings


def is_s3(uri: str) -> bool:
    return is_s3_url(uri)


_CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID": "access_key", "AWS_SECRET_ACCESS_KEY": "secret_key",
                    "AWS_SESSION_TOKEN": "session_token"}


class Credentials(dict):
    """AWS_* credentials taken from this process's environment, to hand to Ray workers that may lack them.

    Travels pickled inside Ray task arguments, never through logs: its repr hides the values.
    """

    @classmethod
    def from_env(cls) -> "Credentials":
        return cls({k: os.environ[k] for k in _CREDENTIAL_VARS if os.environ.get(k)})

    def apply(self) -> None:
        for k, v in self.items():
            os.environ.setdefault(k, v)

    def __repr__(self) -> str:
        return f"Credentials({sorted(self)}, values hidden)"


def filesystem(uri: str, s3: S3Settings):
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI.

    Credentials from the environment are set on the filesystem object explicitly, so that a copy pickled into
    a Ray Data task signs requests even on a node whose environment has none.
    """
    import pyarrow.fs as pafs

    if is_s3(uri):
        kwargs = {"region": s3.region, **{arg: os.environ[var] for var, arg in _CREDENTIAL_VARS.items()
                                          if os.environ.get(var)}}
        if s3.endpoint_url:
            scheme, _, host = s3.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        url = parse_s3_url(uri)
        return pafs.S3FileSystem(**kwargs), f"{url.bucket}/{url.prefix}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def exists(uri: str, s3: S3Settings) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local: str | Path, uri: str, s3: S3Settings) -> None:
    """Copy a local folder's files to `uri` (a local folder or s3:// prefix)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, s3)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# Written last when publishing: a reader that finds these finds everything else already there.
_COMMIT_FILES = ("adapter_config.json", "metrics.json")


def publish_dir(local: str | Path, uri: str, s3: S3Settings) -> None:
    """Copy a local folder to `uri` so that readers see the old folder, nothing, or the whole new one: never a part.

    Everything is first written under a temporary name next to `uri`. A local folder is then renamed into place.
    On S3, which cannot rename, each object is copied server-side to its final key (each copy atomic), the files
    readers start from (adapter_config.json, metrics.json) last, and the temporary objects are deleted."""
    import uuid

    import pyarrow.fs as pafs

    fs, path = filesystem(uri, s3)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    fs.create_dir(tmp, recursive=True)
    try:
        pafs.copy_files(str(local), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if is_s3(uri):
            _publish_s3(fs, tmp, path)
        else:
            old = f"{path}.old-{uuid.uuid4().hex[:12]}"
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.move(path, old)
            fs.move(tmp, path)
            if fs.get_file_info(old).type != pafs.FileType.NotFound:
                fs.delete_dir(old)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)


def _publish_s3(fs, tmp: str, path: str) -> None:
    import pyarrow.fs as pafs

    files = [f.path for f in fs.get_file_info(pafs.FileSelector(tmp, recursive=True)) if f.type == pafs.FileType.File]
    files.sort(key=lambda f: (f.rsplit("/", 1)[-1] in _COMMIT_FILES, f))
    for f in files:
        fs.copy_file(f, path + f[len(tmp):])


def fetch_dir(uri: str, s3: S3Settings, names: tuple[str, ...] | None = None,
              cache_root: str | Path | None = None) -> Path:
    """A local folder holding `uri`'s files: the folder itself when local, else a per-node cached download.

    Several workers on a node may ask at once: each downloads into its own temporary folder and renames it into
    place; the first rename wins and the others drop their copy. `names` limits the download to those files.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return Path(uri).expanduser().resolve()
    if cache_root is None:  # herd's one private cache root (not a shared /tmp path another user could plant files in)
        from serving.expert_parallel.s3 import cache_root as herd_cache_root

        cache_root = herd_cache_root() / "finetune"
    root = Path(cache_root)
    key = hashlib.sha256(f"{s3.endpoint_url}|{uri}|{names}".encode()).hexdigest()[:16]
    final = root / "fetched" / key
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(uri, s3)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist (S3 endpoint {s3.endpoint_url or 'AWS'})")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=key + "."))
    if names is None:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        for name in names:
            if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
                pafs.copy_files(f"{path}/{name}", str(tmp / name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
    (tmp / ".complete").touch()
    try:
        tmp.rename(final)
    except OSError:  # another worker finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final
