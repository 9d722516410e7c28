"""A fine-tuned model over HTTP: `lora_adapter` in the app's args serves finetune's PEFT adapter, answers what
the engine with that adapter answers, and is refused up front when unmergeable or misnamed for the licence."""
from __future__ import annotations

import json

import openai
import pytest

from herd.errors import UserError
from herd_testing import make_adapter
from serving.app import build_app
from serving_http_helpers import delete_app, deploy_app

APP = "http-lora"
NAME = "Llama-4-tiny-support"


@pytest.fixture(scope="module")
def adapter(maverick_tiny, tmp_path_factory):
    """Laid out as finetune writes it: output/adapter plus output/metrics.json naming the adapter."""
    out = tmp_path_factory.mktemp("ft") / "output"
    make_adapter(maverick_tiny, out / "adapter", seed=3)
    (out / "metrics.json").write_text(json.dumps({"adapter_name": NAME}))
    return out / "adapter"


def test_adapter_args_are_checked_before_anything_starts(maverick_tiny, adapter, tmp_path):
    with pytest.raises(UserError, match=r"model name 'support-bot' must begin with \"Llama\""):
        build_app({"model": str(maverick_tiny), "lora_adapter": str(adapter), "served_model_name": "support-bot"})
    with pytest.raises(UserError, match="serve args: lora_adapter: .* no adapter_config.json"):
        build_app({"model": str(maverick_tiny), "lora_adapter": str(tmp_path)})


@pytest.mark.slow
def test_served_adapter_answers_like_the_engine(serve_port, maverick_tiny, adapter):
    from serving.engine import LLMEngine, SamplingParams

    ref = LLMEngine.from_pretrained(maverick_tiny, dtype="float32", max_num_seqs=2, max_model_len=96,
                                    lora_adapter=adapter)
    try:
        want = ref.generate(["Llamas graze"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    finally:
        ref.shutdown()
    base = deploy_app(APP, serve_port, model=str(maverick_tiny), lora_adapter=str(adapter),
                      served_model_name=None)  # the name comes from the fine-tune's metrics.json
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        out = client.completions.create(model=NAME, prompt="Llamas graze", max_tokens=12, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want.outputs[0].text
        assert out.usage.completion_tokens == 12
    finally:
        delete_app(APP)
