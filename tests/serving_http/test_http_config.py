"""Fast checks (no Ray) of what an operator writes: build_app args, the API-keys file; and the metrics merge rule."""
from __future__ import annotations

import pytest

from herd.errors import UserError
from serving.api.auth import KeyChecker, load_api_keys
from serving.api.config import parse_args
from serving.api.errors import ApiError
from serving.api.metrics import STALE_AFTER_S, ReplicaMetrics, merge, render


def test_build_app_args_are_a_closed_schema():
    a = parse_args({"model": "/ckpt/scout", "max_num_seqs": 4, "expert_parallel_size": 2})
    assert a.model_name == "scout" and a.max_num_seqs == 4
    with pytest.raises(UserError, match=r"^serve args: max_num_seq: unknown key \(did you mean 'max_num_seqs'\?\); "
                                        "valid keys in the top level: model, "):
        parse_args({"model": "/ckpt", "max_num_seq": 4})
    with pytest.raises(UserError, match=r"^serve args: max_num_seqs: 0 is not accepted: Input should be greater than "
                                        r"or equal to 1; set it to sequences one replica runs at once \(an upper bound: the KV "
                                        r"cache's free blocks decide\)$"):
        parse_args({"model": "/ckpt", "max_num_seqs": 0})
    with pytest.raises(UserError, match=r"expert_parallel_size \(3\) must be a multiple of tensor_parallel_size"):
        parse_args({"model": "/ckpt", "expert_parallel_size": 3, "tensor_parallel_size": 2})
    with pytest.raises(UserError, match="set worker_num_gpus"):  # else the GPU workers would get no GPU
        parse_args({"model": "/ckpt", "expert_parallel_size": 2, "device": "cuda"})
    assert parse_args({"model": "/ckpt", "expert_parallel_size": 2, "device": "cuda", "worker_num_gpus": 1})


def test_api_keys_file(tmp_path):
    p = tmp_path / "keys.yaml"
    p.write_text("keys:\n  sk-0123456789abcdef-team: team-a\n")
    digests = load_api_keys(p)
    assert "sk-0123456789abcdef-team" not in repr(digests)  # only digests are kept
    checker = KeyChecker(digests)
    assert checker.identity("Bearer sk-0123456789abcdef-team") == "team-a"
    for header, code in [(None, "missing_api_key"), ("Bearer nope-nope-nope-nope", "invalid_api_key"),
                         ("Basic sk-0123456789abcdef-team", "invalid_api_key")]:
        with pytest.raises(ApiError) as e:
            checker.identity(header)
        assert e.value.status == 401 and e.value.code == code
    assert KeyChecker({}).identity(None) is None  # no keys file: no auth
    p.write_text("keys:\n  sk-0123456789abcdef-team: team-a\nkeyz: {}\n")
    with pytest.raises(UserError, match="keyz"):
        load_api_keys(p)
    with pytest.raises(UserError, match="no such|cannot read"):
        load_api_keys(tmp_path / "missing.yaml")


def test_metrics_merge_sums_replicas_keeps_counters_drops_stale_gauges():
    a, b = ReplicaMetrics(), ReplicaMetrics()
    for m, n in ((a, 3), (b, 5)):
        m.inc("herd:prompt_tokens", n)
        m.inc("herd:request_success", 1, "stop")
        m.observe("herd:time_to_first_token_seconds", 0.003)
        m.gauges.update({"herd:num_requests_running": 2, "herd:kv_cache_usage_perc": 0.2 * n / 5})
    now = 1000.0
    merged = merge({"a": (now, a.snapshot()), "b": (now - STALE_AFTER_S - 1, b.snapshot())}, now)
    assert merged["counters"][("herd:prompt_tokens",)] == 8  # a stale replica's counters still count
    assert merged["gauges"]["herd:num_requests_running"] == 2  # ... its gauges do not
    assert merged["gauges"]["herd:num_replicas"] == 1
    text = render(merged, "scout").decode()
    assert 'herd:prompt_tokens_total{model_name="scout"} 8.0' in text
    assert 'herd:request_success_total{finished_reason="stop",model_name="scout"} 2.0' in text
    assert 'herd:time_to_first_token_seconds_bucket{le="0.005",model_name="scout"} 2.0' in text
    assert 'herd:time_to_first_token_seconds_bucket{le="0.001",model_name="scout"} 0.0' in text


def test_engine_counters_are_totals_summed_over_replicas():
    """Prefix-cache and preemption counters are the engine's own totals: set, not added, per push; summed over
    replicas (a replica gone stale still counts)."""
    a, b = ReplicaMetrics(), ReplicaMetrics()
    for m, (queries, hits, preempted) in ((a, (100, 48, 1)), (b, (40, 16, 0))):
        for _ in range(2):  # pushed twice: the same totals
            m.set_counter("herd:prefix_cache_queries", queries)
            m.set_counter("herd:prefix_cache_hits", hits)
            m.set_counter("herd:num_preemptions", preempted)
    now = 1000.0
    text = render(merge({"a": (now, a.snapshot()), "b": (now - STALE_AFTER_S - 1, b.snapshot())}, now),
                  "scout").decode()
    assert 'herd:prefix_cache_queries_total{model_name="scout"} 140.0' in text
    assert 'herd:prefix_cache_hits_total{model_name="scout"} 64.0' in text
    assert 'herd:num_preemptions_total{model_name="scout"} 1.0' in text
    assert "# TYPE herd:num_preemptions_total counter" in text or "# TYPE herd:num_preemptions counter" in text
    assert "# HELP herd:kv_cache_usage_perc Fraction of KV-cache blocks in use" in text
    # Before any engine reports, the counters read 0, as vLLM's do.
    assert 'herd:prefix_cache_hits_total{model_name="scout"} 0.0' in render(merge({}, now), "scout").decode()


def test_lost_licensing_events_reach_metrics_from_every_ingress(tmp_path):
    """The tracker's dropped events (store down, spill full) are a counter on /metrics, summed over ingress
    replicas and kept after an ingress goes away; ingresses are not model replicas (num_replicas, /health)."""
    from licensing import MauTracker
    from serving.api.metrics import FORGET_AFTER_S, MetricsHub
    from serving.usage import NullRecorder, recorder_counters

    tracker = MauTracker(store=str(tmp_path / "store"), key=b"k" * 32, flush_interval_s=0, max_buffered_events=10,
                         spill_dir=str(tmp_path / "spill"), max_spill_bytes=0)
    for i in range(25):  # no room to spill: every full buffer (10 events) is dropped, counted
        tracker.record(f"user-{i}", "chat")
    assert tracker.dropped_events == 20 and recorder_counters(tracker) == {("herd:licensing_dropped_events",): 20.0}
    clock = [1000.0]
    hub = MetricsHub(clock=lambda: clock[0])
    replica = ReplicaMetrics()
    replica.inc("herd:prompt_tokens", 5.0)
    hub.report("model-1", replica.snapshot({"heartbeat_age_s": 0.1, "dead": None}))
    hub.report_ingress("ingress-a", recorder_counters(tracker))
    hub.report_ingress("ingress-b", {("herd:licensing_dropped_events",): 3.0})
    hub.report_ingress("ingress-c", recorder_counters(NullRecorder()))
    text = render(hub.collect(), "scout").decode()
    assert 'herd:licensing_dropped_events_total{model_name="scout"} 23.0' in text
    assert 'herd:num_replicas{model_name="scout"} 1.0' in text
    assert [r["replica"] for r in hub.health()["replicas"]] == ["model-1"]
    clock[0] += FORGET_AFTER_S + 1  # every one goes silent: totals are kept
    assert 'herd:licensing_dropped_events_total{model_name="scout"} 23.0' in render(hub.collect(), "scout").decode()
