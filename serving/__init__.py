"""Serving Llama 4: the model and inference engine (`serving.engine`), expert parallelism over Ray
(`serving.expert_parallel`), and the OpenAI-compatible HTTP server (`serving.app`, `serving.api`)."""
