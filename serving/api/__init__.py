"""The OpenAI-compatible HTTP layer: request/response models, errors, API keys, metrics and the FastAPI routes.

`serving/app.py` wires these parts into Ray Serve. Only `model_server.py` (the model deployment) imports Ray
at module import; `routes.py` and `metrics.py` import it inside the functions that need it, and `protocol`,
`errors`, `auth` and `config` import neither Ray nor the engine, so clients and tests can use them alone.
"""
