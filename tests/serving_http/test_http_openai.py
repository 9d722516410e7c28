"""The OpenAI API over a real Serve app, driven by the official `openai` package and httpx.

The app has 2 model replicas, each expert-parallel over 2 Ray workers (one per simulated node) held in the
replica's own placement group, and API keys. Answers equal the in-process engine's for the same seed (sync,
async and concurrent, streamed with usage); metrics are summed over both replicas; a client that disconnects
mid-stream has its sequence aborted and its KV slot freed.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from serving_http_helpers import API_KEY, MAX_MODEL_LEN, delete_app, deploy_app, metric_value

pytestmark = pytest.mark.slow
APP = "http-openai"
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Tell me about the herd of llamas on the hill."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(serve_port, scout_tiny, keys_file):
    base = deploy_app(APP, serve_port, model=str(scout_tiny), api_keys_file=str(keys_file), num_replicas=2,
                      max_num_seqs=4, expert_parallel_size=2, nodes=["node0", "node1"], worker_num_cpus=0.25)
    yield base
    delete_app(APP)


def reference(engine, prompt, **sampling):
    from serving.engine import SamplingParams

    return engine.generate(prompt, SamplingParams(**sampling))[0]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=1234),
                                      dict(temperature=1.0, seed=7, stop=["the"])])
def test_chat_equals_engine(server, reference_engine, sampling):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    resp = client.chat.completions.create(model="scout-tiny", messages=MESSAGES, max_tokens=12, **sampling)
    ref = reference(reference_engine, reference_engine.apply_chat_template(MESSAGES), max_tokens=12, **sampling)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == "scout-tiny" and resp.id.startswith("chatcmpl-")


def test_async_completions_concurrent_equal_engine(server, reference_engine):
    prompts = ["Once upon a time", "The llama walked", "In the mountains of Peru", "A herd"]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*[
            client.completions.create(model="scout-tiny", prompt=p, max_tokens=10, temperature=0.8, seed=100 + i)
            for i, p in enumerate(prompts)])

    answers = asyncio.run(run())
    for i, (p, resp) in enumerate(zip(prompts, answers)):
        ref = reference(reference_engine, p, max_tokens=10, temperature=0.8, seed=100 + i)
        assert resp.choices[0].text == ref.outputs[0].text, p
        assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_stream_chat_with_usage(server, reference_engine):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    stream = client.chat.completions.create(model="scout-tiny", messages=MESSAGES, max_tokens=16, temperature=0.7,
                                            seed=42, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ref = reference(reference_engine, reference_engine.apply_chat_template(MESSAGES), max_tokens=16,
                    temperature=0.7, seed=42)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.outputs[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_completion_raw_sse(server, reference_engine):
    body = {"model": "scout-tiny", "prompt": "The llama walked", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # no include_usage: no usage fields at all
    ref = reference(reference_engine, "The llama walked", max_tokens=8, temperature=0)
    assert "".join(e["choices"][0]["text"] for e in events) == ref.outputs[0].text
    assert events[-1]["choices"][0]["finish_reason"] == ref.outputs[0].finish_reason


def test_each_replica_reserves_its_expert_workers(server):
    """Serve reserved one placement group per model replica: the replica's bundle, then one per EP worker, pinned
    to node0 and node1 (bundles the engine's workers run in)."""
    import ray
    from ray.util import placement_group_table

    groups = [g for g in placement_group_table().values()
              if g["state"] == "CREATED" and len(g["bundles"]) == 3
              and any("node1" in b for b in g["bundles"].values())]
    assert len(groups) == 2, groups
    node_ids = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for g in groups:
        b = g["bundles"]
        assert b[0] == {"CPU": 0.25}
        assert node_ids[g["bundles_to_node_id"][1]].get("node0") == 1
        assert node_ids[g["bundles_to_node_id"][2]].get("node1") == 1


def test_models_root_health(server):
    r = httpx.get(f"{server}/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["scout-tiny"]
    assert r.json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["scout-tiny"]
    assert "Built with Llama" in httpx.get(f"{server}/").text
    health = httpx.get(f"{server}/health").json()  # the model replica's engine state, from its heartbeat
    assert health["status"] == "ok" and health["healthy"] == 2  # both model replicas
    assert all(r["dead"] is None and r["engine_heartbeat_s_ago"] < 10 for r in health["replicas"])


def _metrics(server) -> str:
    r = httpx.get(f"{server}/metrics")
    assert r.status_code == 200
    return r.text


def _wait_metrics(server, check, timeout=15.0):
    deadline = time.time() + timeout
    while True:
        text = _metrics(server)
        try:
            check(text)
            return text
        except (AssertionError, KeyError):
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def test_metrics_summed_over_replicas(server, reference_engine):
    before = _wait_metrics(server, lambda t: _assert_eq(metric_value(t, "herd:num_replicas"), 2))
    # Let in-flight work from earlier tests settle into the counters first.
    time.sleep(1.0)
    before = _metrics(server)

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*[
            client.completions.create(model="scout-tiny", prompt=f"Llama number {i} says", max_tokens=6 + i,
                                      temperature=0.5, seed=i) for i in range(8)])

    answers = asyncio.run(run())
    pt = sum(a.usage.prompt_tokens for a in answers)
    ct = sum(a.usage.completion_tokens for a in answers)

    def delta(text, name, **labels):
        def value(t):
            try:
                return metric_value(t, name, **labels)
            except KeyError:
                return 0.0
        return value(text) - value(before)

    def check(t):
        assert delta(t, "herd:prompt_tokens_total") == pt
        assert delta(t, "herd:generation_tokens_total") == ct
        finished = sum(delta(t, "herd:request_success_total", finished_reason=r) for r in ("stop", "length"))
        assert finished == 8
        for h in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
            assert delta(t, f"herd:{h}_seconds_count") == 8, h
        assert delta(t, "herd:inter_token_latency_seconds_count") == ct - 8
        assert metric_value(t, "herd:num_requests_running") == 0

    text = _wait_metrics(server, check)
    assert metric_value(text, "herd:num_replicas") == 2
    # Every MoE layer routed the same number of tokens: each token processed goes to top_k experts per layer.
    layers = {}
    for line in text.splitlines():
        if line.startswith("herd:expert_routed_tokens_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            layers.setdefault(labels["layer"], 0.0)
            layers[labels["layer"]] += float(line.rsplit(" ", 1)[1])
    assert len(layers) >= 1 and len(set(layers.values())) == 1 and next(iter(layers.values())) > 0


def _assert_eq(a, b):
    assert a == b, (a, b)


def test_prefix_cache_and_preemption_counters_summed_over_replicas(server):
    """vLLM's prefix-cache and preemption counters from the engines' stats: three requests with one prompt over
    two replicas, so one replica serves it twice and finds its full blocks cached."""
    time.sleep(1.0)  # earlier tests' work settles into the counters
    before = _metrics(server)
    assert "# HELP herd:kv_cache_usage_perc Fraction of KV-cache blocks in use" in before
    prompt = "The herd of llamas walked slowly over the green hill towards the old stone farm where the farmer waited"
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    answers = [client.completions.create(model="scout-tiny", prompt=prompt, max_tokens=2, temperature=0.0)
               for _ in range(3)]
    pt = answers[0].usage.prompt_tokens
    assert 17 <= pt <= MAX_MODEL_LEN - 2  # at least one full 16-token block to share

    def delta(t, name):
        return metric_value(t, name) - metric_value(before, name)

    def check(t):
        assert delta(t, "herd:prefix_cache_queries_total") == 3 * pt
        hits = delta(t, "herd:prefix_cache_hits_total")
        # Hits are whole blocks short of the prompt's last token, on at least one of the later two requests.
        assert hits > 0 and hits % 16 == 0 and hits <= 2 * ((pt - 1) // 16 * 16), hits
        assert delta(t, "herd:num_preemptions_total") == 0

    _wait_metrics(server, check)


def test_client_disconnect_aborts_sequence(server):
    def aborts(t):
        try:
            return metric_value(t, "herd:request_success_total", finished_reason="abort")
        except KeyError:
            return 0.0

    before = aborts(_metrics(server))
    body = {"model": "scout-tiny", "prompt": "A very long story:", "max_tokens": 80, "temperature": 1.0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                if got == 2:
                    break  # leaving the block closes the connection mid-stream

    def check(t):
        assert aborts(t) == before + 1
        assert metric_value(t, "herd:num_requests_running") == 0
        assert metric_value(t, "herd:kv_cache_usage_perc") == 0

    _wait_metrics(server, check)
    # The server is still serving.
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "scout-tiny", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_worker_death_is_a_500_without_internals_and_the_server_recovers(server, reference_engine):
    """Kill every expert-parallel worker mid-stream: the stream ends with a server_error event naming only the
    request id, then [DONE]; the engines rebuild their workers and later answers equal the engine's again.
    Runs last in this module: it takes the app's workers down."""
    import os
    import signal

    from ray._private.state import actors

    body = {"model": "scout-tiny", "prompt": "A long story:", "max_tokens": 80, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        workers = [a for a in actors().values() if a["State"] == "ALIVE" and "EPWorker" in a["ActorClassName"]]
        assert len(workers) == 4, [a["ActorClassName"] for a in workers]
        for w in workers:
            os.kill(w["Pid"], signal.SIGKILL)
        rest = [line for line in lines if line]
    errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
    assert len(errors) == 1, rest[-5:]
    assert errors[0]["type"] == "server_error" and errors[0]["code"] == "internal_error"
    assert errors[0]["message"].startswith("Internal server error while handling request cmpl-")
    assert "Traceback" not in "".join(rest) and "worker" not in errors[0]["message"].lower()
    assert rest[-1] == "data: [DONE]"

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    ref = reference(reference_engine, reference_engine.apply_chat_template(MESSAGES), max_tokens=8, temperature=0)
    deadline = time.time() + 120
    for _ in range(4):  # both replicas, whichever the router picks
        while True:
            try:
                resp = client.chat.completions.create(model="scout-tiny", messages=MESSAGES, max_tokens=8,
                                                      temperature=0)
                break
            except openai.InternalServerError:  # a request that met the other replica's dead workers
                assert time.time() < deadline
                time.sleep(1)
        assert resp.choices[0].message.content == ref.outputs[0].text
