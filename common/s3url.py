"""S3 URLs: `s3://bucket/prefix` -> (bucket, prefix), with errors that name the field that held the URL."""
from __future__ import annotations

from typing import NamedTuple

from common.errors import UserError


class S3UrlError(UserError, ValueError):
    """An s3:// URL herd cannot use; the message names the field and shows the form to write."""


class S3Url(NamedTuple):
    """A parsed `s3://bucket/prefix`; the prefix has no leading or trailing slash ('' for the whole bucket)."""

    bucket: str
    prefix: str

    def key(self, rel: str) -> str:
        """The object key of `rel` under the prefix."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_s3_url(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3_url(url: str, field: str = "S3 URL") -> S3Url:
    """`s3://bucket/some/prefix/` -> S3Url("bucket", "some/prefix"); `field` names the setting in errors."""
    if not is_s3_url(url):
        raise S3UrlError(f"{field}: {url!r} is not an s3:// URL; write it as s3://bucket/prefix")
    bucket, _, prefix = str(url)[len("s3://"):].partition("/")
    if not bucket:
        raise S3UrlError(f"{field}: {url!r} has no bucket name; write it as s3://bucket/prefix")
    return S3Url(bucket, prefix.strip("/"))
