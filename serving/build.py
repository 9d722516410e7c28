"""The one place that picks an executor for an engine configuration and hands it to the engine.

`serving/engine/` knows only the `Executor` interface; this factory knows which implementations exist, so the
engine package never imports the expert-parallel one (nor Ray) when the model runs in one process.
"""
from __future__ import annotations

from serving.config import EngineConfig


def build_executor(config: EngineConfig):
    """`LocalExecutor` for one process, the expert-parallel executor over Ray workers otherwise."""
    if config.parallel.enabled:
        from serving.expert_parallel.executor import build_ep_executor

        return build_ep_executor(config)
    from serving.engine.executor import LocalExecutor

    return LocalExecutor.from_config(config)
