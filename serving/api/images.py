"""Chat image parts -> the engine's prepared image prompt, in the model replica, before anything is queued.

`protocol.check_chat` turns each OpenAI `image_url` part into the chat template's {"type": "image"} with its URL
and place ("messages[i].content[j]"); the template renders it as `<|image|>`. Here, off the event loop, every
image is fetched (data: URLs; http(s) only from the operator's allowed hosts), checked against the Serve args'
limits (images per request, bytes, pixels), decoded, preprocessed and expanded into its `<|patch|>` tokens, so
usage.prompt_tokens counts the image tokens and a bad image is a 400 naming its message and part. The engine
then only runs the vision tower (serving/engine/multimodal.py).
"""
from __future__ import annotations

from serving.api.errors import bad_request


def image_parts(messages: list[dict]) -> list[dict]:
    """The {"type": "image", "url", "where"} parts of rendered messages, in prompt order."""
    return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if p.get("type") == "image"]


def text_chars(content) -> int:
    """Characters of a message's content, its image parts (data URLs) left out: they count as image tokens."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(0 if isinstance(p, dict) and p.get("type") == "image" else
                   len(p["text"]) if isinstance(p, dict) and isinstance(p.get("text"), str) else len(str(p))
                   for p in content)
    return len(str(content))


def image_prompt(llm, limits, parts: list[dict], prompt_ids: list[int], max_model_len: int) -> dict:
    """A prepared prompt dict ({"prompt_token_ids": expanded ids, "multi_modal_data": {"image": [...]}})."""
    from serving.image_io import ImageError, load_image_url

    if llm.image_support is None:
        raise bad_request(f"{parts[0]['where']}: this model has no vision tower (a text-only checkpoint); send "
                          "text only.", param=parts[0]["where"], code="unsupported_content")
    if len(parts) > limits.max_images_per_request:
        extra = parts[limits.max_images_per_request]["where"]
        raise bad_request(f"{extra}: the request holds {len(parts)} images; at most "
                          f"{limits.max_images_per_request} are allowed per request.", param=extra,
                          code="too_many_images")
    images = []
    for part in parts:
        try:
            images.append(load_image_url(part["url"], part["where"], limits))
        except ImageError as e:
            raise bad_request(str(e), param=part["where"], code="invalid_image") from None
    try:
        ids, prepared = llm.image_support.expand(prompt_ids, images, max_images=limits.max_images_per_request)
    except (ValueError, OSError) as e:  # an image Pillow decoded but cannot convert, or a placeholder mismatch
        raise bad_request(f"messages: the images could not be prepared ({e}).", param="messages",
                          code="invalid_image") from None
    if len(ids) >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens; the messages are "
                          f"{len(ids)} tokens with their images ({len(ids) - len(prompt_ids) + len(parts)} image "
                          "tokens), leaving no room for a completion. Send fewer or smaller images.",
                          param="messages", code="context_length_exceeded")
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": prepared}}
