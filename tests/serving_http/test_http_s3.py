"""The app serving a checkpoint straight from S3 (`model: s3://...`, as `herd render --target serve` writes for
cloud clusters): the replica fetches config and tokenizer, its 2 expert-parallel workers fetch their weights by
byte range from the loopback S3 server, and answers equal the in-process engine's on the local copy."""
from __future__ import annotations

import openai
import pytest

from serving_http_helpers import delete_app, deploy_app

pytestmark = pytest.mark.slow
APP = "http-s3"


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, s3_server):
    import boto3

    from serving.expert_parallel.s3 import upload_checkpoint

    endpoint, bucket = s3_server, "herd-http-s3"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/llama4/scout-tiny"
    upload_checkpoint(scout_tiny, url, endpoint_url=endpoint)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    base = deploy_app(APP, serve_port, model=url, s3_endpoint_url=endpoint, env_vars=creds, expert_parallel_size=2,
                      nodes=["node0", "node1"], max_num_seqs=2, worker_num_cpus=0.25)
    yield base
    delete_app(APP)


def test_s3_checkpoint_answers_equal_engine(server, reference_engine):
    from serving.engine import SamplingParams

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Where do llamas live?"}]
    resp = client.chat.completions.create(model="scout-tiny", messages=msgs, max_tokens=10, temperature=0.8, seed=9)
    ref = reference_engine.generate(reference_engine.apply_chat_template(msgs),
                                    SamplingParams(max_tokens=10, temperature=0.8, seed=9))[0]
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
