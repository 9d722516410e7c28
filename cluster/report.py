"""`herd plan`'s terminal output: a Plan as a short table an ops engineer reads top to bottom.

Bytes are printed in GB (10^9 bytes), the unit cloud GPU specs and the issue's worked examples use.
"""
from __future__ import annotations

from cluster.planner import GB, Plan


def format_plan(p: Plan, source: str | None = None) -> str:
    """The plan as text; ends with the verdict, the reasons and the fixes."""
    m, lay, g, kv = p.model, p.layout, p.per_gpu, p.kv
    unit = "GPU" if lay["gpus_per_node"] else "worker"
    dev = f"{lay['workers_per_node']} x {lay['gpu']}" if lay["gpus_per_node"] else f"{lay['workers_per_node']} CPU workers"
    lines = [f"herd plan: {p.cluster}" + (f" ({source})" if source else ""), ""]
    lines += [
        f"model      {m['name']}: {_count(m['params_total'])} text params ({_count(m['params_non_expert'])} "
        f"non-expert, {_count(m['params_routed_experts'])} in {m['experts']} routed experts x {m['moe_layers']} "
        f"MoE layers); weights {m['weight_dtype']} = {_gb(m['weight_bytes_non_expert'] + m['weight_bytes_routed_experts'])},"
        f" KV cache {m['kv_cache_dtype']}",
        f"layout     {lay['replicas']} replica(s) x {lay['nodes_per_replica']} node(s) x {dev} "
        f"(node group {lay['node_group']}: {lay['nodes_needed']} of {lay['nodes_available']} nodes used); "
        f"non-expert weights tensor-parallel over {lay['tensor_parallel_size']} per node, routed experts over "
        f"{lay['expert_parallel_size']} (expert-parallel size)",
        f"per {unit:<6} {g.total / GB:.1f} GB, usable {g.usable / GB:.1f} GB:",
        f"  non-expert share     {g.non_expert / GB:9.2f} GB",
        f"  routed-expert slice  {g.routed_experts / GB:9.2f} GB",
        f"  vision tower share   {g.vision / GB:9.2f} GB  ({_count(m['params_vision'])} params; images: up to "
        f"{m['image_tokens_per_image_max']:,} prompt tokens each, {m['image_tokens_per_request_max']:,} per request)",
        f"  runtime reserve      {g.reserve / GB:9.2f} GB",
        f"  KV-cache budget      {g.kv_budget / GB:9.2f} GB",
        f"  KV needed            {g.kv_needed / GB:9.2f} GB  ({lay['max_concurrent_sequences']} sequences x "
        f"{lay['max_context_len']} tokens per replica, at full context)",
        f"  headroom             {g.headroom / GB:9.2f} GB",
        f"KV cache   {kv.bytes_per_token_within_chunk:,.0f} B per token up to {kv.chunk_size} tokens "
        f"({kv.chunked_layers + kv.global_layers} layers), {kv.bytes_per_token_beyond_chunk:,.0f} B per token beyond "
        f"(only the {kv.global_layers} global NoPE layers grow; the {kv.chunked_layers} chunked layers keep at most "
        f"{kv.chunk_size})",
        f"           paged in {kv.block_size}-token blocks: {kv.cache_tokens_per_replica:,} tokens in the cache per "
        f"replica ({kv.cache_tokens_per_node:,} per node); {kv.mean_sequences_per_replica:,} sequences of "
        f"{kv.mean_sequence_tokens:,} tokens (serving.mean_sequence_tokens) at once per replica "
        f"({kv.mean_sequences_per_node:,} per node, {kv.mean_sequences_total:,} in the cluster)",
        f"           longest single sequence {lay['max_context_len']:,} tokens (serving.max_context_len; the cache "
        f"could hold one of {kv.longest_context_per_node:,} per node); {kv.sequences_per_node:,} sequences that long "
        f"per node, {kv.sequences_per_replica:,} per replica, {kv.sequences_total:,} in the cluster when "
        "serving.mean_sequence_tokens is that long",
    ]
    lines += _placement_lines(p)
    lines.append(_cost_line(p))
    lines.append("")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    if p.fits:
        lines.append("FITS")
    else:
        lines.append("DOES NOT FIT")
        lines += [f"  because {r}" for r in p.reasons]
        lines += [f"  fix: {f}" for f in p.fixes]
    return "\n".join(lines)


def _count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(int(n))


def _gb(b: float) -> str:
    return f"{b / GB:.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def _ranges(experts: list[int]) -> str:
    out, i = [], 0
    while i < len(experts):
        j = i
        while j + 1 < len(experts) and experts[j + 1] == experts[j] + 1:
            j += 1
        out.append(str(experts[i]) if i == j else f"{experts[i]}-{experts[j]}")
        i = j + 1
    return ",".join(out)


def _placement_lines(p: Plan) -> list[str]:
    pm = p.placement
    if not pm.moe_layers:
        return ["placement  no MoE layers"]
    scope = "every MoE layer" if pm.is_uniform() else f"MoE layer {pm.moe_layers[0]} (layers differ)"
    head = f"placement  {p.placement_source}, {scope}:"
    unit = "gpu" if p.layout["gpus_per_node"] else "worker"
    rows = [f"  node {node} {unit} {w}: experts {_ranges(pm.experts_on(pm.rank(node, w), pm.moe_layers[0]))}"
            for node in range(pm.nodes) for w in range(pm.workers_per_node[node])]
    if len(rows) > 16:
        rows = rows[:8] + [f"  ... {len(rows) - 12} more workers ..."] + rows[-4:]
    return [head, *rows]


def _cost_line(p: Plan) -> str:
    c = p.cost
    if c.per_hour is None:
        return f"cost       unknown: no price_per_hour for {', '.join(c.missing_prices)}"
    line = f"cost       ${c.per_hour:,.2f} per hour (all nodes)"
    if c.per_million_tokens is not None:
        line += f"; about ${c.per_million_tokens:,.2f} per million tokens ({c.assumption})"
    else:
        line += "; pass --throughput TOK_PER_S for an estimated cost per million tokens"
    return line
