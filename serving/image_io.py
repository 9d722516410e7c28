"""Image bytes and URLs -> PIL images, within the operator's limits, before anything reaches the engine.

Accepted: `data:image/...;base64,...` URLs always; `http(s)://` URLs only for hosts the operator lists
(`allowed_hosts`, empty by default), fetched with a time limit and a byte limit. Formats: PNG, JPEG, WebP and GIF
(its first frame). Every image is checked against the byte and pixel limits before it is decoded, so a
decompression bomb is refused from its header. Errors are `ImageError`s whose message starts with where the
image was (e.g. "messages[0].content[1]") and says what to change.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from urllib.parse import urlsplit

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


class ImageError(ValueError):
    """An image the server will not take; the message names where it was and why."""


@dataclass(frozen=True)
class ImageLimits:
    """Operator limits on request images (Serve args / cluster file `serving.images`)."""

    max_images_per_request: int = 8
    max_image_bytes: int = 5 * 2**20  # base64 in an 8 MiB request body (serving/api/routes.py)
    max_image_pixels: int = 40_000_000  # width x height of one image
    allowed_hosts: tuple[str, ...] = ()  # hosts http(s) image URLs may name; empty: data: URLs only
    fetch_timeout_s: float = 10.0


def decode_image(data: bytes, where: str, limits: ImageLimits = ImageLimits()):
    """Bytes of a PNG, JPEG, WebP or GIF -> a loaded PIL image (a GIF's first frame)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ImageError(f"{where}: the image is {len(data)} bytes; at most {limits.max_image_bytes} are allowed")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own header check, for sizes beyond ~179 Mpixels
        raise ImageError(f"{where}: the image has over {Image.MAX_IMAGE_PIXELS * 2} pixels; at most "
                         f"{limits.max_image_pixels} are allowed, resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"{where}: the image cannot be decoded ({exc.__class__.__name__}); send PNG, JPEG, WebP "
                         "or GIF") from None
    if img.format not in FORMATS:
        raise ImageError(f"{where}: image format {img.format} is not accepted; send PNG, JPEG, WebP or GIF")
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise ImageError(f"{where}: the image is {w}x{h} = {w * h} pixels; at most {limits.max_image_pixels} are "
                         "allowed, resize it first")
    try:
        img.seek(0)
        img.load()
    except Exception as exc:  # truncated or corrupt data after a valid header
        raise ImageError(f"{where}: the image cannot be decoded ({exc}); send a complete PNG, JPEG, WebP or "
                         "GIF") from None
    return img


def decode_data_url(url: str, where: str, limits: ImageLimits = ImageLimits()):
    """A `data:image/...;base64,...` URL -> a PIL image."""
    head, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep or ";base64" not in head:
        raise ImageError(f"{where}: a data URL must look like data:image/png;base64,<data>")
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise ImageError(f"{where}: the image is about {len(payload) * 3 // 4} bytes; at most "
                         f"{limits.max_image_bytes} are allowed")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URL's payload is not valid base64") from None
    return decode_image(data, where, limits)


def load_image_url(url: str, where: str, limits: ImageLimits = ImageLimits()):
    """An image part's URL -> a PIL image: data: URLs, or http(s) from an allowed host."""
    if url.startswith("data:"):
        return decode_data_url(url, where, limits)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"{where}: image URL scheme {parts.scheme or '(none)'!r} is not accepted; send a data: "
                         "URL (data:image/png;base64,...)")
    if parts.hostname not in limits.allowed_hosts:
        allowed = ", ".join(limits.allowed_hosts) or "none: the operator has not enabled image URLs"
        raise ImageError(f"{where}: fetching images from {parts.hostname!r} is not allowed (allowed hosts: "
                         f"{allowed}); send the image inline as a data: URL")
    return decode_image(_fetch(url, where, limits), where, limits)


def _fetch(url: str, where: str, limits: ImageLimits) -> bytes:
    import time

    import httpx

    deadline = time.monotonic() + limits.fetch_timeout_s
    try:
        with httpx.stream("GET", url, timeout=limits.fetch_timeout_s, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise ImageError(f"{where}: fetching the image URL gave HTTP {resp.status_code}")
            data = bytearray()
            for block in resp.iter_bytes():
                data += block
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("total time")
                if len(data) > limits.max_image_bytes:
                    raise ImageError(f"{where}: the image at the URL is over {limits.max_image_bytes} bytes; at "
                                     f"most {limits.max_image_bytes} are allowed")
            return bytes(data)
    except httpx.TimeoutException:
        raise ImageError(f"{where}: fetching the image URL took over {limits.fetch_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ImageError(f"{where}: the image URL could not be fetched ({exc.__class__.__name__})") from None
