"""The OpenAI-compatible HTTP layer: request/response models, errors, API keys, metrics and the FastAPI routes.

Nothing here imports Ray or the engine at module import; `serving/app.py` wires these parts into Ray Serve.
"""
