"""Image requests through herd's engine equal transformers' Llama 4 (fp32, maverick-tiny, 56-px tiles).

The reference calls transformers' modules as `Llama4ForConditionalGeneration.forward` does (its forward fails at
its return in transformers 5.24): image features -> multi_modal_projector -> scattered over the prompt's <|patch|>
embeddings -> the language model, greedy by uncached argmax. Both sides get the same pixel_values and prompt ids.
herd's side: the engine's public API (greedy tokens, and log-probabilities: the chosen token and the top 20 at
every prompt position and generated token, within 1e-4), and the model itself driven piece by piece with the
executor's fusion (raw fp32 logits of every prompt position within 1e-4).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from herd_testing import fp32_engine
from serving.engine import SamplingParams
from serving.engine.scheduler import RequestStatus

FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
TOL = 1e-4


def image(name: str) -> Image.Image:
    with Image.open(FIXTURES / name) as img:
        img.load()
        return img


@pytest.fixture(scope="module")
def engine(maverick_tiny):
    with fp32_engine(maverick_tiny, max_num_seqs=8, max_model_len=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def small_steps_engine(maverick_tiny):
    """At most 5 tokens a step: prefill pieces cut the <|patch|> runs and cross the 32-token attention chunks."""
    with fp32_engine(maverick_tiny, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=5) as eng:
        yield eng


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
    """(greedy tokens, fp32 log-softmax [prompt + generated - 1, V]: row i predicts token i + 1)."""
    embed = model.get_input_embeddings()
    x = embed(torch.tensor([ids]))
    if pixel_values:
        feats = model.get_image_features(pixel_values=torch.cat(pixel_values).float()).last_hidden_state
        projected = model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        mask = (torch.tensor([ids]) == model.config.image_token_id)[..., None]  # prompt positions only
        x = x.masked_scatter(mask, projected)
    lm = model.language_model
    rows = list(lm(inputs_embeds=x, use_cache=False).logits[0])
    tokens = []
    for _ in range(NEW_TOKENS):
        tokens.append(int(rows[-1].argmax()))
        x = torch.cat([x, embed(torch.tensor([[tokens[-1]]]))], dim=1)
        rows.append(lm(inputs_embeds=x, use_cache=False).logits[0, -1])
    return tokens, torch.log_softmax(torch.stack(rows[:-1]).float(), dim=-1)


def assert_logprobs_match(positions, expected_rows: torch.Tensor) -> int:
    """Every logprob the engine reported equals the reference's at that row; returns how many were compared."""
    n = 0
    for pos, row in zip(positions, expected_rows):
        if pos is None:
            continue
        for token, lp in pos.items():
            assert abs(lp.logprob - row[token].item()) < TOL, (token, lp.logprob, row[token].item())
            n += 1
    return n


def run(engine, prompt, **extra):
    return engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                  **extra))[0]


def prepared(engine, prompt):
    """The request the engine makes of a prompt: expanded ids and the same pixel values it will encode."""
    req = engine.make_request("inspect", prompt)
    return req.prompt_token_ids, [img.tiles.pixel_values for img in req.images or []], req


CASES = {
    "single_tile": lambda e: chat(e, image("tile56.png"), "Describe this picture."),
    "grid_2x3_plus_global": lambda e: chat(e, image("grid150x100.png"), "What is in it?"),
    "two_images": lambda e: chat(e, image("grid150x100.png"), "and", image("paletted90x130.gif"), "compare."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_request_equals_transformers(case, engine, ref_model):
    prompt = CASES[case](engine)
    ids, pixels, req = prepared(engine, prompt)
    assert {"single_tile": [(1, 1)], "grid_2x3_plus_global": [(2, 3)],
            "two_images": [(2, 3), (3, 2)]}[case] == [img.tiles.grid for img in req.images]
    expected_tokens, expected = reference(ref_model, ids, pixels)
    encoded = engine.image_support.images_encoded
    out = run(engine, prompt, logprobs=20)  # prefilled in chunk-sized pieces
    assert out.outputs[0].token_ids == expected_tokens
    assert out.prompt_token_ids == ids
    assert engine.image_support.images_encoded == encoded + len(pixels)  # once per image
    assert assert_logprobs_match(out.outputs[0].logprobs, expected[len(ids) - 1:]) >= 20 * NEW_TOKENS
    # every prompt position too (prompt_logprobs: each piece returns all of its positions' logits)
    scored = run(engine, prompt, prompt_logprobs=20)
    assert scored.outputs[0].token_ids == expected_tokens
    assert assert_logprobs_match(scored.prompt_logprobs[1:], expected[: len(ids) - 1]) >= 20 * (len(ids) - 1)


@pytest.mark.parametrize("piece", [32, 7])
def test_raw_fp32_logits_within_1e4(piece, engine, ref_model, maverick_tiny):
    """The model itself, driven piece by piece (32: at chunk boundaries; 7: cutting the patch runs), with each
    piece's image rows fused exactly as the executor fuses them: every prompt position's logits."""
    from herd_testing import SlotTables

    from serving.engine.executor import SeqChunk
    from serving.engine.multimodal import attach_image_embeds
    from serving.loader import load_model

    prompt = CASES["two_images"](engine)
    ids, pixels, req = prepared(engine, prompt)
    model = load_model(maverick_tiny, "float32")
    tables, chunk = SlotTables(model, 1, len(ids)), model.cfg.attention_chunk_size
    out, pos = [], 0
    while pos < len(ids):
        end = min((pos // chunk + 1) * chunk, len(ids), pos + piece)
        c = SeqChunk(0, ids[pos:end], pos, True)
        c.mm_embeds = engine.image_support.chunk_embeds(req.images, pos, end - pos)
        batch = tables.batch([(0, c.token_ids, pos, True)])
        batch.logits_idx_N = torch.arange(end - pos)
        attach_image_embeds(batch, [c])
        out.append(model(batch))
        pos = end
    embed = ref_model.get_input_embeddings()
    with torch.no_grad():
        x = embed(torch.tensor([ids]))
        feats = ref_model.get_image_features(pixel_values=torch.cat(pixels).float()).last_hidden_state
        x = x.masked_scatter((torch.tensor([ids]) == ref_model.config.image_token_id)[..., None],
                             ref_model.multi_modal_projector(feats.reshape(-1, feats.shape[-1])))
        expected = ref_model.language_model(inputs_embeds=x, use_cache=False).logits[0]
    got = torch.cat(out)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_image_embeddings_change_the_answer(engine):
    """The fused rows matter: the same prompt with another single-tile image gives another distribution."""
    a = run(engine, chat(engine, image("tile56.png"), "Describe."), logprobs=5).outputs[0].logprobs[0]
    b = run(engine, chat(engine, image("1x1.png"), "Describe."), logprobs=5).outputs[0].logprobs[0]
    assert {t: round(lp.logprob, 2) for t, lp in a.items()} != {t: round(lp.logprob, 2) for t, lp in b.items()}


def test_batch_mixing_text_and_images_equals_each_alone(engine):
    text_ids = engine.apply_chat_template([{"role": "user", "content": "Tell me about the sea and the sky."}])
    batch = [text_ids, CASES["grid_2x3_plus_global"](engine), {"prompt": "plain text as a dict"},
             CASES["two_images"](engine), CASES["single_tile"](engine)]
    alone = [engine.generate(p, GREEDY)[0].outputs[0].token_ids for p in batch]
    together = [o.outputs[0].token_ids for o in engine.generate(batch, GREEDY)]
    assert together == alone


def _recompute(engine, req) -> None:
    """Make the engine drop the request's cache and recompute it later, as a preemption does."""
    sched = engine.scheduler
    if hasattr(sched, "_preempt"):  # the scheduler's own recompute preemption
        sched._preempt(req)
        return
    engine.executor.free(req.seq_id)  # a scheduler without preemption: do what one would
    sched.running.remove(req)
    req.num_computed, req.status = 0, RequestStatus.WAITING
    sched.waiting.appendleft(req)


def test_prefill_split_at_chunk_boundaries_and_inside_images(small_steps_engine, ref_model):
    """5-token pieces cut the patch runs and cross 32-token attention chunks; a recompute mid-prefill (as after a
    preemption) reuses the image embeddings without running the vision tower again."""
    engine = small_steps_engine
    prompt = CASES["two_images"](engine)
    ids, pixels, _ = prepared(engine, prompt)
    assert len(ids) > 2 * engine.config.attention_chunk_size
    expected_tokens, expected = reference(ref_model, ids, pixels)

    engine.add_request("split", prompt, GREEDY)
    r = engine.scheduler.waiting[-1]
    for _ in range(9):  # part of the prefill: the first image's rows computed, the second's not yet
        engine.step()
    assert 0 < r.num_computed < len(ids)
    encoded = engine.image_support.images_encoded
    pending = sum(1 for i in r.images if i.embeds_RD is None)
    assert pending < len(r.images)
    _recompute(engine, r)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert outputs[0].outputs[0].token_ids == expected_tokens
    assert engine.image_support.images_encoded == encoded + pending  # no image encoded twice
    out = run(engine, prompt, logprobs=20)  # again (from the prefix cache, where the engine has one)
    assert out.outputs[0].token_ids == expected_tokens
    assert_logprobs_match(out.outputs[0].logprobs, expected[len(ids) - 1:])


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


def test_async_engine_takes_prompt_dicts(engine, maverick_tiny):
    """`AsyncLLMEngine.add_request` with a vLLM-style dict (PIL images) streams the synchronous engine's tokens."""
    import asyncio

    from serving.engine import AsyncLLMEngine

    prompt = {"prompt": "Look: <|image|> and <|image|>.",
              "multi_modal_data": {"image": [image("tile56.png"), image("alpha120x90.png")]}}
    expected = engine.generate(prompt, GREEDY)[0].outputs[0].token_ids
    async_engine = AsyncLLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=2, max_model_len=512)

    async def run() -> list[int]:
        tokens = []
        async for delta in async_engine.add_request("async-image", prompt, GREEDY):
            tokens += delta.new_token_ids
        return tokens

    try:
        assert asyncio.run(run()) == expected
    finally:
        async_engine.shutdown()
