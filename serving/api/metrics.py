"""Prometheus metrics for the whole application: vLLM's serving set under a `herd:` prefix, summed over replicas.

How it works across replicas: each model replica keeps its own `ReplicaMetrics` (plain counters and histogram
buckets, cheap to update per token) and pushes a snapshot every `PUSH_INTERVAL_S` to one named Ray actor, the
`MetricsHub` of the application. GET /metrics on any ingress replica asks the hub for the merge and renders it
with prometheus_client. Counters and histograms are summed over every replica that ever reported (a replica that
goes away keeps its totals, folded into the hub's `retired` totals once it is forgotten, so counters never go
backwards); gauges are summed (requests running/waiting) or
averaged (KV-cache usage) over replicas that reported in the last `STALE_AFTER_S`.

Why not Ray's own metrics (ray.util.metrics): they are exported per node by Ray's metrics agent on ports a scraper
must discover, with Ray's name prefix; one endpoint on the application that already sums replicas is what an
operator pointing Prometheus at the server expects, as with vLLM's /metrics.
"""
from __future__ import annotations

import bisect
import time

PUSH_INTERVAL_S = 0.5
STALE_AFTER_S = 10.0
FORGET_AFTER_S = 300.0  # a replica silent this long is gone: its totals fold into `retired`, its entry is dropped
# A model replica whose engine loop has not gone round for this long is stalled (a step takes ms to seconds).
HEARTBEAT_STALE_S = 120.0

# Bucket edges as vLLM uses them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

HISTOGRAMS = {
    "herd:time_to_first_token_seconds": (TTFT_BUCKETS, "Time from request arrival to its first generated token."),
    "herd:inter_token_latency_seconds": (ITL_BUCKETS, "Time between consecutive generated tokens of a request."),
    "herd:e2e_request_latency_seconds": (LATENCY_BUCKETS, "Time from request arrival to its last token."),
    "herd:request_queue_time_seconds": (LATENCY_BUCKETS, "Time a request waited before its first step ran."),
}
COUNTERS = {
    "herd:prompt_tokens": "Prompt tokens processed.",
    "herd:generation_tokens": "Tokens generated.",
    "herd:request_success": "Finished requests, by finish reason (stop, length, abort, error).",
    "herd:expert_routed_tokens": "Tokens the router sent to each routed expert, by MoE layer and expert.",
    "herd:prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "herd:prefix_cache_hits": "Prompt tokens found in the prefix cache (served from cached KV blocks, not computed).",
    "herd:num_preemptions": "Running sequences preempted for KV-cache blocks (freed, recomputed later).",
    "herd:licensing_dropped_events": "Usage events the licensing tracker lost (its store unreachable and its local "
                                     "spill full): those users are not counted toward MAU. Alert on any increase.",
}
GAUGES = {
    "herd:num_requests_running": "Requests in the engine's running batch.",
    "herd:num_requests_waiting": "Requests waiting for a slot.",
    "herd:kv_cache_usage_perc": "Fraction of KV-cache blocks in use (1 = full; the fuller of the global and chunked "
                                "layers' pools), averaged over replicas.",
    "herd:num_replicas": "Model replicas that reported in the last few seconds.",
}
_AVERAGED_GAUGES = {"herd:kv_cache_usage_perc"}
_LABELS = {"herd:request_success": ("finished_reason",), "herd:expert_routed_tokens": ("layer", "expert")}


class ReplicaMetrics:
    """One replica's metrics as plain numbers: counters keyed by label values, histogram bucket counts."""

    def __init__(self):
        self.counters: dict[tuple, float] = {}      # (name, *label values) -> total
        self.hists = {n: ([0] * (len(b) + 1), [0.0]) for n, (b, _) in HISTOGRAMS.items()}  # counts, [sum]
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, value: float = 1.0, *labels: str) -> None:
        key = (name, *labels)
        self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, seconds: float) -> None:
        buckets = HISTOGRAMS[name][0]
        counts, total = self.hists[name]
        counts[bisect.bisect_left(buckets, seconds)] += 1
        total[0] += seconds

    def set_counter(self, name: str, total: float, *labels: str) -> None:
        """A counter the engine keeps itself (cumulative since the replica started)."""
        self.counters[(name, *labels)] = float(total)

    def set_expert_counts(self, counts_LE) -> None:
        """The engine's cumulative routed-token counts, [num MoE layers, num experts]."""
        for layer, row in enumerate(counts_LE):
            for expert, n in enumerate(row):
                self.counters[("herd:expert_routed_tokens", str(layer), str(expert))] = float(n)

    def snapshot(self, health: dict | None = None) -> dict:
        """What a replica pushes; `health` is its engine's state ({"heartbeat_age_s", "dead"})."""
        return {"counters": dict(self.counters), "gauges": dict(self.gauges),
                "hists": {n: (list(c), s[0]) for n, (c, s) in self.hists.items()}, "health": health}


def merge(snapshots: dict[str, tuple[float, dict]], now: float, retired: dict | None = None) -> dict:
    """Sum replica snapshots ({replica: (reported_at, snapshot)}) as the module docstring says; `retired` holds
    the counter and histogram totals of replicas the hub has forgotten."""
    counters: dict[tuple, float] = {}
    hists: dict[str, tuple[list[int], float]] = {}
    gauges: dict[str, float] = {}
    fresh = 0
    entries = list(snapshots.values())
    if retired:
        entries.append((float("-inf"), {"counters": retired["counters"], "hists": retired["hists"], "gauges": {}}))
    for reported_at, snap in entries:
        for key, v in snap["counters"].items():
            counters[key] = counters.get(key, 0.0) + v
        for name, (counts, total) in snap["hists"].items():
            acc = hists.setdefault(name, ([0] * len(counts), 0.0))
            hists[name] = ([a + b for a, b in zip(acc[0], counts)], acc[1] + total)
        if now - reported_at <= STALE_AFTER_S:
            fresh += 1
            for name, v in snap["gauges"].items():
                gauges[name] = gauges.get(name, 0.0) + v
    for name in _AVERAGED_GAUGES & gauges.keys():
        gauges[name] /= max(fresh, 1)
    gauges["herd:num_replicas"] = float(fresh)
    return {"counters": counters, "hists": hists, "gauges": gauges}


def render(merged: dict, model_name: str) -> bytes:
    """The merged metrics in Prometheus text format (every series labelled with model_name, as vLLM does)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families = []
    for name, doc in GAUGES.items():
        fam = GaugeMetricFamily(name, doc, labels=["model_name"])
        fam.add_metric([model_name], merged["gauges"].get(name, 0.0))
        families.append(fam)
    for name, doc in COUNTERS.items():
        labels = _LABELS.get(name, ())
        fam = CounterMetricFamily(name, doc, labels=["model_name", *labels])
        rows = sorted((k, v) for k, v in merged["counters"].items() if k[0] == name)
        for key, v in rows:
            fam.add_metric([model_name, *key[1:]], v)
        if not labels and not rows:
            fam.add_metric([model_name], 0.0)
        families.append(fam)
    for name, (buckets, doc) in HISTOGRAMS.items():
        counts, total = merged["hists"].get(name, ([0] * (len(buckets) + 1), 0.0))
        cum, acc = [], 0
        for edge, c in zip([*map(str, buckets), "+Inf"], counts):
            acc += c
            cum.append((edge, acc))
        fam = HistogramMetricFamily(name, doc, labels=["model_name"])
        fam.add_metric([model_name], buckets=cum, sum_value=total)
        families.append(fam)

    class _Fixed:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


class MetricsHub:
    """The application's metrics meeting point (a named Ray actor): replicas report, ingresses collect.

    A replica that has not reported for FORGET_AFTER_S is forgotten: its counters and histograms fold into
    `retired` (so totals never go back) and its entry goes, so the hub's memory follows the live replicas, not
    every replica that ever ran. The actor is restarted if its process dies; it then starts empty and the replicas'
    next pushes (cumulative snapshots) restore the live totals within a push interval."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.snapshots: dict[str, tuple[float, dict]] = {}
        self.ingresses: dict[str, tuple[float, dict]] = {}  # ingress replicas' own counters (never "replicas")
        self.retired: dict = {"counters": {}, "hists": {}}

    def report(self, replica_id: str, snapshot: dict) -> None:
        now = self.clock()
        self.snapshots[replica_id] = (now, snapshot)
        self._forget(now)

    def report_ingress(self, ingress_id: str, counters: dict) -> None:
        """An ingress replica's own cumulative counters (the licensing tracker's lost events): summed with the
        model replicas' counters, but not counted as a model replica nor in /health."""
        now = self.clock()
        self.ingresses[ingress_id] = (now, {"counters": dict(counters), "hists": {}, "gauges": {}})
        self._forget(now)

    def _forget(self, now: float) -> None:
        for table in (self.snapshots, self.ingresses):
            gone = [r for r, (at, _) in table.items() if now - at > FORGET_AFTER_S]
            if gone:
                folded = merge({r: table.pop(r) for r in gone}, now, self.retired)
                self.retired = {"counters": folded["counters"], "hists": folded["hists"]}

    def collect(self) -> dict:
        now = self.clock()
        self._forget(now)
        merged = merge(self.snapshots, now, self.retired)
        for _, snap in self.ingresses.values():
            for key, v in snap["counters"].items():
                merged["counters"][key] = merged["counters"].get(key, 0.0) + v
        return merged

    def health(self) -> dict:
        """The model replicas' state from their last reports (no generation): see `replica_health`."""
        return replica_health(self.snapshots, self.clock())


def replica_health(snapshots: dict[str, tuple[float, dict]], now: float) -> dict:
    """{"healthy": n, "replicas": [...]}: a replica is healthy when it reported in the last STALE_AFTER_S, its
    engine loop is running, and the loop's last heartbeat is under HEARTBEAT_STALE_S old."""
    rows = []
    for rid, (reported_at, snap) in sorted(snapshots.items()):
        h = snap.get("health") or {}
        age = now - reported_at
        if age > STALE_AFTER_S and not h.get("dead"):
            continue  # a replica that went away (or is not up yet): not part of the application's state
        hb = h.get("heartbeat_age_s")
        ok = age <= STALE_AFTER_S and not h.get("dead") and hb is not None and hb < HEARTBEAT_STALE_S
        rows.append({"replica": rid, "healthy": bool(ok), "reported_s_ago": round(age, 2),
                     "engine_heartbeat_s_ago": None if hb is None else round(hb + age, 2), "dead": h.get("dead")})
    return {"healthy": sum(r["healthy"] for r in rows), "replicas": rows}


def hub_handle(app_name: str):
    """The application's MetricsHub actor, created by whoever asks first (detached: it outlives replicas)."""
    import ray

    return ray.remote(num_cpus=0)(MetricsHub).options(
        name=f"herd-metrics-{app_name}", namespace="herd", get_if_exists=True, lifetime="detached",
        max_restarts=-1, max_task_retries=-1,  # a dead hub comes back; the handles replicas hold keep working
    ).remote()
