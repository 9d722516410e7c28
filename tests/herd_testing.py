"""Small helpers that test modules import by name (`from herd_testing import free_port`).

Test modules must not import `conftest`: several folders have one, and whichever was imported first wins.
"""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@contextmanager
def fp32_engine(path, **kwargs):
    """An fp32 `LLMEngine` on a checkpoint, shut down after (the fixtures' `with fp32_engine(...) as e: yield e`)."""
    from serving.engine import LLMEngine

    engine = LLMEngine.from_pretrained(path, dtype="float32", **kwargs)
    try:
        yield engine
    finally:
        engine.shutdown()


LORA_TARGETS = (r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|feed_forward\.shared_expert\."
                r"(gate_proj|up_proj|down_proj)|feed_forward\.(gate_proj|up_proj|down_proj))")


def make_adapter(base_path, out, seed: int = 0, **overrides):
    """A PEFT LoRA adapter on `base_path` (every target kind finetune/ uses, the fused routed experts included)
    with random, non-zero factors, saved to `out` with `save_pretrained`; returns the PEFT model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.model import ROUTED_EXPERT_PARAMS, load_base

    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                  task_type="CAUSAL_LM", target_parameters=list(ROUTED_EXPERT_PARAMS), init_lora_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_path), LoraConfig(**kwargs))
    with torch.no_grad():  # PEFT's random init is small; scale B up so the adapter changes greedy tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(out)
    return model.eval()


class SlotTables:
    """Drive `serving.model.Transformer` directly, without the engine's block manager: each sequence ("slot")
    owns a fixed run of KV-cache blocks, as a static slot cache would (`shuffle` scatters them, as a busy pool
    hands blocks out). Allocates the model's cache."""

    def __init__(self, model, num_slots: int, max_len: int, block_size: int = 16, shuffle: bool = False):
        import torch

        self.model, self.bs, self.chunk = model, block_size, model.cfg.attention_chunk_size
        self.g = -(-max_len // block_size)
        self.c = -(-min(self.chunk, max_len) // block_size)
        model.allocate_kv_cache(num_slots * self.g, num_slots * self.c, block_size)
        order = torch.randperm if shuffle else (lambda n, generator=None: torch.arange(n))
        gen = torch.Generator().manual_seed(0)
        self.global_ids = order(num_slots * self.g, generator=gen).tolist()
        self.chunked_ids = order(num_slots * self.c, generator=gen).tolist()

    def span(self, slot: int, ids: list[int], start: int, need_logits: bool = True) -> tuple:
        return (ids, start, need_logits, self.global_ids[slot * self.g:(slot + 1) * self.g],
                start // self.chunk * self.chunk, self.chunked_ids[slot * self.c:(slot + 1) * self.c])

    def batch(self, spans: list[tuple[int, list[int], int, bool]], device: str = "cpu"):
        """A `Batch` of (slot, token_ids, start_pos, need_logits) pieces."""
        from serving.model import Batch

        return Batch.build([self.span(*s) for s in spans], device, self.chunk, self.bs)


def deploy_app(name: str, port: int, max_model_len: int = 96, **args) -> str:
    """Deploy herd's app (`build_app` with `args`) at / on the session's Serve and wait until /health says a
    replica is up; returns the base URL."""
    import httpx
    from ray import serve

    from serving.app import build_app

    args.setdefault("max_model_len", max_model_len)
    args.setdefault("dtype", "float32")
    args.setdefault("served_model_name", "scout-tiny")
    args.setdefault("app_name", name)
    args.setdefault("replica_num_cpus", 0.25)
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"app {name} did not answer on {base} within 120 s")
