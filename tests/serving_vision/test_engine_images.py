"""Image requests through herd's engine equal transformers' Llama 4 (fp32, maverick-tiny, 56-px tiles).

The reference calls transformers' modules as `Llama4ForConditionalGeneration.forward` does (its forward fails at
its return in transformers 5.24): image features -> multi_modal_projector -> scattered over the prompt's <|patch|>
embeddings -> the language model, greedy by uncached argmax. Both sides get the same pixel_values and prompt ids.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from serving.engine import SamplingParams
from serving.engine.executor import SeqChunk
from serving.engine.multimodal import attach_image_embeds
from serving.engine.scheduler import RequestStatus
from serving.model import Batch

FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def image(name: str) -> Image.Image:
    with Image.open(FIXTURES / name) as img:
        img.load()
        return img


@pytest.fixture(scope="module")
def engine(maverick_tiny):
    from serving.engine import LLMEngine

    eng = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=8, max_model_len=512)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def ref_model(maverick_tiny):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(maverick_tiny, dtype=torch.float32).eval()


def chat(engine, *parts) -> dict:
    content = [{"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
               for p in parts]
    return engine.chat_prompt([{"role": "user", "content": content}])


@torch.no_grad()
def reference(model, ids: list[int], pixel_values: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens, fp32 logits of every prompt position) from transformers' modules."""
    embed = model.get_input_embeddings()
    x = embed(torch.tensor([ids]))
    if pixel_values:
        feats = model.get_image_features(pixel_values=torch.cat(pixel_values).float()).last_hidden_state
        projected = model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        mask = (torch.tensor([ids]) == model.config.image_token_id)[..., None]  # prompt positions only
        x = x.masked_scatter(mask, projected)
    lm = model.language_model
    prompt_logits = lm(inputs_embeds=x, use_cache=False).logits[0]
    tokens, logits = [], prompt_logits[-1]
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        x = torch.cat([x, embed(torch.tensor([[tokens[-1]]]))], dim=1)
        logits = lm(inputs_embeds=x, use_cache=False).logits[0, -1]
    return tokens, prompt_logits


def herd_prompt_logits(engine, prompt: dict, piece: int = 10**9) -> tuple[torch.Tensor, object]:
    """Logits of every prompt position from herd's model, prefilled in pieces (cut at chunk boundaries and every
    `piece` tokens), each piece fused with its image rows exactly as the engine does it."""
    req = engine.make_request("logits", prompt)
    model, chunk = engine.executor.model, engine.config.attention_chunk_size
    ids, out, pos = req.prompt_token_ids, [], 0
    slot = engine.executor.slots.slot_for(req.seq_id)
    try:
        while pos < len(ids):
            end = min((pos // chunk + 1) * chunk, len(ids), pos + piece)
            c = SeqChunk(req.seq_id, ids[pos:end], pos, True)
            if req.images:
                c.mm_embeds = engine.image_support.chunk_embeds(req.images, pos, end - pos)
            batch = Batch.build([(slot, c.token_ids, pos, True)], "cpu", chunk)
            batch.logits_idx_N = torch.arange(end - pos)
            attach_image_embeds(batch, [c])
            out.append(model(batch))
            pos = end
    finally:
        engine.executor.free(req.seq_id)
    return torch.cat(out), req


def pixels(req) -> list[torch.Tensor]:
    return [img.tiles.pixel_values for img in req.images or []]


CASES = {
    "single_tile": lambda e: chat(e, image("tile56.png"), "Describe this picture."),
    "grid_2x3_plus_global": lambda e: chat(e, image("grid150x100.png"), "What is in it?"),
    "two_images": lambda e: chat(e, image("grid150x100.png"), "and", image("paletted90x130.gif"), "compare."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_request_equals_transformers(case, engine, ref_model):
    prompt = CASES[case](engine)
    got_logits, req = herd_prompt_logits(engine, prompt)
    grids = [img.tiles.grid for img in req.images]
    assert {"single_tile": [(1, 1)], "grid_2x3_plus_global": [(2, 3)],
            "two_images": [(2, 3), (3, 2)]}[case] == grids
    expected_tokens, expected_logits = reference(ref_model, req.prompt_token_ids, pixels(req))
    assert (got_logits - expected_logits).abs().max().item() < 1e-4
    encoded = engine.image_support.images_encoded
    out = engine.generate(prompt, GREEDY)[0]
    assert out.outputs[0].token_ids == expected_tokens
    assert engine.image_support.images_encoded == encoded + len(grids)  # once per image
    assert out.prompt_token_ids == req.prompt_token_ids


def test_image_embeddings_change_the_answer(engine, ref_model):
    """The fused rows matter: the same prompt with another image (same grid) gives other logits."""
    a, _ = herd_prompt_logits(engine, chat(engine, image("tile56.png"), "Describe."))
    b, _ = herd_prompt_logits(engine, chat(engine, image("1x1.png"), "Describe."))
    assert a.shape == b.shape and (a[-1] - b[-1]).abs().max() > 1e-2


def test_batch_mixing_text_and_images_equals_each_alone(engine):
    text_ids = engine.apply_chat_template([{"role": "user", "content": "Tell me about the sea and the sky."}])
    batch = [text_ids, CASES["grid_2x3_plus_global"](engine), {"prompt": "plain text as a dict"},
             CASES["two_images"](engine), CASES["single_tile"](engine)]
    alone = [engine.generate(p, GREEDY)[0].outputs[0].token_ids for p in batch]
    together = [o.outputs[0].token_ids for o in engine.generate(batch, GREEDY)]
    assert together == alone


def test_prefill_split_at_chunk_boundaries_and_inside_images(engine, ref_model):
    """Pieces of 5 tokens cut the patch runs and cross 32-token attention chunks; a recompute (as after a
    preemption) reuses the image embeddings without running the vision tower again."""
    prompt = CASES["two_images"](engine)
    got_logits, req = herd_prompt_logits(engine, prompt, piece=5)
    expected_tokens, expected_logits = reference(ref_model, req.prompt_token_ids, pixels(req))
    assert len(req.prompt_token_ids) > 2 * engine.config.attention_chunk_size
    assert (got_logits - expected_logits).abs().max().item() < 1e-4

    sched = engine.scheduler
    old_budget, sched.max_num_batched_tokens = sched.max_num_batched_tokens, 5
    try:
        engine.add_request("split", prompt, GREEDY)
        r = engine._requests["split"]
        for _ in range(9):  # part of the prefill: some image rows computed, some not
            engine.step()
        assert 0 < r.num_computed < len(r.prompt_token_ids)
        encoded = engine.image_support.images_encoded
        pending = sum(1 for i in r.images if i.embeds_RD is None)
        assert pending < len(r.images)  # at least one image was encoded before the recompute
        # recompute from scratch (what a preemption does): the slot goes, the request waits again
        engine.executor.free(r.seq_id)
        sched.running.remove(r)
        r.num_computed, r.status = 0, RequestStatus.WAITING
        sched.waiting.appendleft(r)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
    finally:
        sched.max_num_batched_tokens = old_budget
    assert outputs[0].outputs[0].token_ids == expected_tokens
    assert engine.image_support.images_encoded == encoded + pending  # no image encoded twice


def test_bad_image_prompts_are_explained(engine):
    ids = engine.apply_chat_template([{"role": "user", "content": "no placeholder here"}])
    with pytest.raises(ValueError, match="0 <\\|image\\|> placeholder\\(s\\) but 1 image"):
        engine.make_request("x", {"prompt_token_ids": ids, "multi_modal_data": {"image": [image("1x1.png")]}})
    with pytest.raises(ValueError, match="give PIL.Image.Image objects"):
        engine.make_request("x", {"prompt": "<|image|>", "multi_modal_data": {"image": "picture.png"}})
    with pytest.raises(ValueError, match="at most 8 are allowed"):
        engine.make_request("x", {"prompt": "<|image|>" * 9, "multi_modal_data": {"image": [image("1x1.png")] * 9}})
    with pytest.raises(ValueError, match="unknown key.*'images'"):
        engine.make_request("x", {"prompt": "hi", "images": []})
    with pytest.raises(ValueError, match="Llama 4 takes only 'image'"):
        engine.make_request("x", {"prompt": "hi", "multi_modal_data": {"video": []}})
