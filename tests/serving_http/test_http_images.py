"""Images over HTTP: the official `openai` client sends `image_url` parts to a real Serve app (maverick-tiny,
56-px tiles) and gets the in-process engine's answer; every bad image is a 400 naming its message and part, and
the server keeps serving.

The app allows http(s) image URLs from 127.0.0.1 only (a loopback file server in this module), and small limits
(3 images, 64 KB, 1 Mpixel) so each limit is reached with small fixtures.
"""
from __future__ import annotations

import base64
import functools
import http.server
import io
import random
import threading
from pathlib import Path

import openai
import pytest
from PIL import Image

from serving_http_helpers import delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-images"
MODEL = "maverick-tiny"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"
LIMITS = dict(max_images_per_request=3, max_image_bytes=64 * 1024, max_image_pixels=1_000_000)


def data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"save_all": True} if fmt == "GIF" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def fixture_url(name: str) -> str:
    mime = "gif" if name.endswith(".gif") else "png"
    return f"data:image/{mime};base64,{base64.b64encode((FIXTURES / name).read_bytes()).decode()}"


def ask(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def file_server():
    """A loopback HTTP server for the fixture images (the allowed host)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURES))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def client(serve_port, maverick_tiny):
    base = deploy_app(APP, serve_port, model=str(maverick_tiny), served_model_name=MODEL, max_model_len=512,
                      max_num_seqs=4, image_url_allowed_hosts=["127.0.0.1"], **LIMITS)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    delete_app(APP)


@pytest.fixture(scope="module")
def engine(maverick_tiny):
    from serving.engine import LLMEngine

    eng = LLMEngine.from_pretrained(str(maverick_tiny), dtype="float32", max_model_len=512, max_num_seqs=4)
    yield eng
    eng.shutdown()


def engine_answer(engine, messages: list[dict], images: list[Image.Image]):
    """The engine's greedy answer for the same conversation, images as PIL parts."""
    from serving.engine import SamplingParams

    parts = [{"type": "text", "text": messages[0]["content"][0]["text"]}] + [{"type": "image", "image": i}
                                                                             for i in images]
    prompt = engine.chat_prompt([{"role": "user", "content": parts}])
    return engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8))[0]


def test_data_url_image_gets_the_engines_answer(client, engine):
    img = Image.open(FIXTURES / "grid150x100.png")
    messages = ask(fixture_url("grid150x100.png"))
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.0)
    ref = engine_answer(engine, messages, [img])
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)  # the 2x3 grid + global tile's 37 tokens count
    assert resp.usage.prompt_tokens > 37


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_other_formats_decode_as_the_engine_does(client, engine, fmt):
    src = Image.open(FIXTURES / "paletted90x130.gif") if fmt == "GIF" else Image.open(FIXTURES / "tile56.png")
    url = fixture_url("paletted90x130.gif") if fmt == "GIF" else data_url(src, fmt)
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    decoded.load()
    resp = client.chat.completions.create(model=MODEL, messages=ask(url), max_tokens=8, temperature=0.0)
    ref = engine_answer(engine, ask(url), [decoded])
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_two_images_and_an_allowed_http_url_streamed(client, engine, file_server):
    urls = [fixture_url("tile56.png"), f"http://127.0.0.1:{file_server}/alpha120x90.png"]
    stream = client.chat.completions.create(model=MODEL, messages=ask(*urls), max_tokens=8, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = engine_answer(engine, ask(*urls), [Image.open(FIXTURES / "tile56.png"),
                                             Image.open(FIXTURES / "alpha120x90.png")])
    assert text == ref.outputs[0].text
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)


def _tiny_png(size: tuple[int, int]) -> str:
    return data_url(Image.new("RGB", size, (10, 200, 30)), "PNG")


BAD = {
    "undecodable": (ask(f"data:image/png;base64,{base64.b64encode(b'not an image at all').decode()}"),
                    "messages[0].content[1]", "cannot be decoded"),
    "not_base64": (ask("data:image/png;base64,@@@"), "messages[0].content[1]", "not valid base64"),
    "too_many_bytes": (ask(data_url(Image.frombytes("RGB", (200, 200), random.Random(0).randbytes(120000)),
                                    "PNG")), "messages[0].content[1]", "at most 65536 are allowed"),
    "too_many_pixels": (ask(_tiny_png((1100, 1000))), "messages[0].content[1]", "1100x1000 = 1100000 pixels"),
    "too_many_images": (ask(*[_tiny_png((8, 8))] * 4), "messages[0].content[4]", "4 images; at most 3"),
    "host_not_allowed": (ask("http://localhost:9/x.png"), "messages[0].content[1]", "'localhost' is not allowed"),
    "scheme": (ask("file:///etc/passwd"), "messages[0].content[1]", "scheme 'file' is not accepted"),
    "not_user": ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": _tiny_png((8, 8))}}]},
                  {"role": "user", "content": "hi"}], "messages[0].content[0]", "user messages only"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_images_are_400_naming_the_part(client, case):
    messages, where, text = BAD[case]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert info.value.param == where, info.value.message
    assert where in info.value.message and text in info.value.message


def test_server_keeps_serving_after_bad_images(client):
    resp = client.chat.completions.create(model=MODEL, messages=ask(_tiny_png((8, 8))), max_tokens=3)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 3
