"""An image request with expert parallelism (EP=2 over the two simulated nodes; EP=4 with tensor parallelism)
gives the single-process engine's tokens; the vision tower runs once per image in the engine's process and the
workers receive the fused rows with their prefill pieces."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from serving.engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
FIXTURES = Path(__file__).parents[1] / "fixtures" / "images"


def _prompt(engine) -> dict:
    imgs = [Image.open(FIXTURES / "grid150x100.png"), Image.open(FIXTURES / "paletted90x130.gif")]
    return engine.chat_prompt([{"role": "user", "content": [
        {"type": "image", "image": imgs[0]}, {"type": "text", "text": "Compare with"},
        {"type": "image", "image": imgs[1]}]}])


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["ep2_engine", "ep4_engine"], ids=["ep2-2nodes", "ep4-2nodes-tp2"])
def test_image_request_equals_single_process(fixture, request, reference_engine):
    engine = request.getfixturevalue(fixture)
    assert engine.image_support is not None  # the tower loads from where the weights are (S3 for ep2)
    expected = reference_engine.generate(_prompt(reference_engine), GREEDY)[0]
    before = engine.image_support.images_encoded
    got = engine.generate([_prompt(engine), "A text-only prompt beside it"], GREEDY)
    assert got[0].outputs[0].token_ids == expected.outputs[0].token_ids
    assert got[0].prompt_token_ids == expected.prompt_token_ids
    assert engine.image_support.images_encoded == before + 2  # once per image, not once per worker
    alone = reference_engine.generate("A text-only prompt beside it", GREEDY)[0]
    assert got[1].outputs[0].token_ids == alone.outputs[0].token_ids
