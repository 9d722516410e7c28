"""Image bytes and URLs within the operator's limits (serving/image_io.py), and the Serve args that set them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from serving.image_io import ImageError, ImageLimits, decode_image, load_image_url

FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"


def test_http_urls_are_off_by_default():
    with pytest.raises(ImageError, match=r"messages\[0\].content\[1\]: fetching images from 'example.com' is not "
                                         r"allowed \(allowed hosts: none: the operator has not enabled"):
        load_image_url("https://example.com/cat.png", "messages[0].content[1]")


def test_gif_gives_its_first_frame():
    img = decode_image((FIXTURES / "paletted90x130.gif").read_bytes(), "x")
    assert img.format == "GIF" and img.tell() == 0
    first = img.convert("RGB").getpixel((89, 0))
    assert first != (0, 255, 0)  # the second frame is all green


def test_pixel_limit_is_checked_from_the_header():
    buf = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buf, format="PNG")  # 20 Mpixel, a few KB compressed
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match="5000x4000 = 20000000 pixels; at most 1000000"):
        decode_image(buf.getvalue(), "img", ImageLimits(max_image_pixels=1_000_000))


def _png_header(w: int, h: int) -> bytes:
    """A PNG that only claims its size (no pixel data): what a decompression bomb's header looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size,text", [((5000, 5000), "5000x5000 = 25000000 pixels; at most 1000000"),
                                       ((20000, 10000), "over 178956970 pixels; at most 1000000")])
def test_bombs_are_refused_from_the_header(size, text):
    with pytest.raises(ImageError, match=text):
        decode_image(_png_header(*size), "img", ImageLimits(max_image_pixels=1_000_000))


def test_other_formats_and_truncated_data_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    with pytest.raises(ImageError, match="format BMP is not accepted"):
        decode_image(buf.getvalue(), "img")
    png = (FIXTURES / "tile336.png").read_bytes()
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(png[: len(png) // 2], "img")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert load_image_url(url, "img").size == (336, 336)


def test_serve_args_image_limits():
    from common.errors import ServeConfigError
    from serving.api.config import parse_args

    args = parse_args({"model": "/m"})
    assert args.image_limits() == ImageLimits()
    assert args.image_limits().max_images_per_request == 8 and args.image_limits().allowed_hosts == ()
    with pytest.raises(ServeConfigError, match="image_url_allowed_hosts"):
        parse_args({"model": "/m", "image_url_allowed_host": ["a"]})
    with pytest.raises(ServeConfigError, match="max_images_per_request"):
        parse_args({"model": "/m", "max_images_per_request": 100})
