"""Small helpers that test modules import by name (`from herd_testing import free_port`).

Test modules must not import `conftest`: several folders have one, and whichever was imported first wins.
"""
from __future__ import annotations

import socket
import time


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
