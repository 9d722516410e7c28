"""The inference engine: continuous batching over one model executor, sampling, detokenization, async streaming.

Public names (vLLM's): `LLMEngine`, `AsyncLLMEngine`, `SamplingParams`, `RequestOutput`, `CompletionOutput`.
They are imported on first use so that `import serving.engine` stays light.
"""
from __future__ import annotations

_EXPORTS = {
    "LLMEngine": "serving.engine.llm_engine",
    "AsyncLLMEngine": "serving.engine.async_engine",
    "SamplingParams": "serving.engine.params",
    "RequestOutput": "serving.engine.outputs",
    "CompletionOutput": "serving.engine.outputs",
    "RequestDelta": "serving.engine.outputs",
    "EngineStats": "serving.engine.outputs",
    "SeqChunk": "serving.engine.executor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serving.engine' has no attribute {name!r}")
