"""What a Llama 4 checkpoint is: model presets, config, checkpoint writer/reader, tokenizer and chat format,
and the sizing arithmetic (parameter counts, bytes per dtype, KV-cache bytes) the planner and engine share."""
from llama4.config import RopeScaling, TextConfig
from llama4.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "RopeScaling", "TextConfig", "get_preset"]
