"""The HTTP app with expert parallelism: a model replica whose experts live on 2 Ray workers (one per simulated
node, in the replica's own placement group) answers exactly as the in-process engine does."""
from __future__ import annotations

import openai
import pytest

from serving_http_helpers import delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-ep"
MESSAGES = [{"role": "user", "content": "Where do llamas live?"}]


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny):
    base = deploy_app(APP, serve_port, model=str(scout_tiny), expert_parallel_size=2, nodes=["node0", "node1"],
                      max_num_seqs=2, worker_num_cpus=0.25)
    yield base
    delete_app(APP)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, seed=2024)])
def test_ep2_chat_equals_engine(server, reference_engine, sampling):
    from serving.engine import SamplingParams

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="scout-tiny", messages=MESSAGES, max_tokens=10, **sampling)
    ref = reference_engine.generate(reference_engine.apply_chat_template(MESSAGES),
                                    SamplingParams(max_tokens=10, **sampling))[0]
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_ep2_streamed_completion_equals_engine(server, reference_engine):
    from serving.engine import SamplingParams

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    chunks = list(client.completions.create(model="scout-tiny", prompt="The herd", max_tokens=10, temperature=0.6,
                                            seed=5, stream=True, stream_options={"include_usage": True}))
    ref = reference_engine.generate("The herd", SamplingParams(max_tokens=10, temperature=0.6, seed=5))[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)
