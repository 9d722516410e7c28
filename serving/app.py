"""herd's Ray Serve application: an HTTP ingress (FastAPI, OpenAI routes) in front of model replicas.

    client --HTTP--> Serve proxy --> Ingress (auth, validation, SSE) --handle--> ModelServer (AsyncLLMEngine)
                                                                                  └─ with EP: Ray workers in the
                                                                                     replica's placement group

`build_app(args)` is the `import_path` of a Serve config (`serving.app:build_app`, args as in
serving/api/config.py); `herd serve` calls it too. A model replica reserves its expert-parallel workers'
bundles through Serve's `placement_group_bundles` (bundle 0 is the replica itself), so Serve scales and restarts
whole model copies, and the engine places its workers in that group.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` type of the route methods
# (Serve rebuilds the ingress class, and string annotations then resolve to nothing, giving 422s).

import logging
import os
import uuid

from fastapi import FastAPI, Request
from ray import serve

from serving.api.config import ServeArgs, parse_args
from serving.api.errors import ApiError
from serving.api.routes import ROOT_PAGE, OpenAIServer, error_response
from serving.api.model_server import ModelServer

log = logging.getLogger("herd.serving.app")

web = FastAPI(title="herd", description="OpenAI-compatible Llama 4 serving. Built with Llama.", docs_url=None,
              redoc_url=None, openapi_url=None)


@web.exception_handler(404)
async def _not_found(request: Request, exc):
    return error_response(ApiError(404, f"No route {request.method} {request.url.path}; see / for the endpoints.",
                                   code="not_found"))


@web.exception_handler(405)
async def _bad_method(request: Request, exc):
    err = ApiError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
    return error_response(err)


# Bounded at the proxy too: past 1000 in flight and 1000 queued per ingress replica, Serve's proxy answers 503.
@serve.deployment(name="Ingress", max_ongoing_requests=1000, max_queued_requests=1000,
                  ray_actor_options={"num_cpus": 0.1})
@serve.ingress(web)
class Ingress:
    """The HTTP face: every route defers to `OpenAIServer`; the model is reached through a Serve handle."""

    def __init__(self, model_handle, args: dict, key_digests: dict[str, str]):
        from serving.api.auth import KeyChecker
        from serving.api.metrics import hub_handle
        from serving.api.routes import is_backpressure
        from serving.usage import make_recorder

        self.args = ServeArgs.model_validate(args)
        self.model = model_handle
        self.hub = hub_handle(self.args.app_name)
        self.recorder = make_recorder(self.args.licensing_store, required=self.args.require_licensing)
        self.server = OpenAIServer(self.args.model_name, self.args.max_model_len or 0, self._generate,
                                   self._metrics, KeyChecker(key_digests), self.recorder, is_backpressure,
                                   self.args.retry_after_s, self.args.product,
                                   trust_user_field=self.args.trust_user_field,
                                   metrics_require_key=self.args.metrics_require_key)
        self.server.call_model = self._call_model
        self.server.prefix_cache_per_api_key = self.args.prefix_cache_per_api_key
        self.ingress_id = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pusher = None

    async def _call_model(self, kind: str, job: dict) -> dict:
        return await self.model.tokenizer_job.remote(job)

    async def _generate(self, job: dict):
        self._ensure_pusher()
        stream = self.model.options(stream=True).generate.remote(job)
        try:
            async for item in stream:
                yield item
        finally:
            stream.cancel()  # no-op once finished; on a client disconnect it aborts the sequence

    async def _metrics(self) -> bytes:
        from serving.api.metrics import render

        await self._report_counters()  # this ingress's own count is exact in its own answer
        return render(await self.hub.collect.remote(), self.args.model_name)

    async def _report_counters(self) -> None:
        """Push this ingress's licensing counters to the hub: cumulative, so a repeat changes nothing, and sent
        every time, so a restarted (empty) hub has them back within one push."""
        from serving.usage import recorder_counters

        await self.hub.report_ingress.remote(self.ingress_id, recorder_counters(self.recorder))

    async def _push_counters(self) -> None:
        """Every few seconds, so /metrics on any ingress shows the lost events of every ingress."""
        import asyncio

        while True:
            try:
                await self._report_counters()
            except Exception as e:  # metrics must never take the ingress down
                log.warning("ingress counters push failed: %s", e.__class__.__name__)
            await asyncio.sleep(5.0)

    def _ensure_pusher(self) -> None:
        import asyncio

        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_counters())

    @web.get("/")
    async def root(self):
        from fastapi.responses import HTMLResponse

        return HTMLResponse(ROOT_PAGE)

    @web.get("/health")
    async def health(self):
        """200 while at least one model replica's engine is alive (its last heartbeat, as pushed to the metrics
        hub: no generation), else 503; the body lists each replica's state."""
        import asyncio

        from fastapi.responses import JSONResponse

        try:
            state = await asyncio.wait_for(self.hub.health.remote(), timeout=5)
        except Exception as e:  # the hub itself is unreachable: say so, never a 500
            return JSONResponse({"status": "unavailable", "reason": f"metrics hub: {e.__class__.__name__}"},
                                status_code=503)
        ok = state["healthy"] > 0
        return JSONResponse({"status": "ok" if ok else "unavailable", **state}, status_code=200 if ok else 503)

    @web.get("/v1/models")
    async def models(self, request: Request):
        return await self.server.models(request)

    @web.get("/metrics")
    async def metrics(self, request: Request):
        return await self.server.metrics(request)

    @web.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self.server.chat(request)

    @web.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.server.completions(request)

    @web.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self.server.tokenize(request)

    @web.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self.server.detokenize(request)

    @web.get("/openapi.json")
    async def openapi(self):
        return self.server.openapi()

    def __del__(self):
        # Serve calls this on graceful shutdown: flush the licensing tracker's buffered (hashed) events.
        close = getattr(getattr(self, "recorder", None), "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass


def model_deployment_options(a: ServeArgs) -> dict:
    """Replicas, request bounds and resources of the model deployment (placement group bundles with EP)."""
    opts = {
        "num_replicas": a.num_replicas,
        # A replica accepts more calls than its engine can run or queue, so the engine's bounded queue decides
        # (503 at once, no waiting); the handle's own queue is a bounded backstop for bursts (503 past it).
        "max_ongoing_requests": 2 * a.max_num_seqs + a.max_waiting_requests,
        "max_queued_requests": a.max_num_seqs + a.max_waiting_requests,
        "ray_actor_options": {"num_cpus": a.replica_num_cpus, "num_gpus": a.replica_num_gpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 5,
    }
    if a.env_vars:  # expert-parallel workers, created by the replica, inherit its runtime_env
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(a.env_vars)}
    if a.expert_parallel_size > 1:
        # Bundle 0 is the replica; then one per worker, as the engine's worker group expects them (node-major,
        # pinned to `nodes` when given).
        workers = a.parallel_config().worker_bundles("cuda" if a.worker_num_gpus else "cpu")
        bundles = [{"CPU": a.replica_num_cpus}, *workers]
        opts["ray_actor_options"].pop("num_gpus")
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = "PACK"
    return opts


def build_app(args: dict):
    """The Serve application for `serve deploy` / `serve.run`: `serving.app:build_app` with `args`."""
    from common.errors import UserError
    from serving.api.auth import load_api_keys

    a = parse_args(args)
    cfg = _checkpoint_config(a.model)
    if cfg is not None:  # the layout's model-dependent rules (same as the engine's), before any replica starts
        from serving.config import LayoutNames

        a.parallel_config().validate(cfg, "cpu", names=LayoutNames(prefix="serve args: "))
    if a.max_model_len is None:
        if a.model.startswith("s3://"):
            raise UserError("serve args: set max_model_len for an s3:// model (its config is read by the replicas)")
        if cfg is None:
            raise UserError(f"{a.model}/config.json: cannot read the checkpoint's config; pass a checkpoint folder "
                            "as `model` or set max_model_len")
    a = _fit_max_model_len(a, cfg)
    if a.lora_adapter:
        _check_adapter(a)
    digests = load_api_keys(a.api_keys_file) if a.api_keys_file else {}  # a bad file is refused before any banner
    a = _check_licensing(a)
    plain = a.model_dump()
    model = ModelServer.options(**model_deployment_options(a)).bind(plain)
    return Ingress.options(ray_actor_options={"num_cpus": a.ingress_num_cpus}).bind(model, plain, digests)


def max_model_len_note(args: dict) -> str | None:
    """Why build_app(args) serves a shorter max_model_len than the checkpoint's context, or None (for `herd serve`
    to print)."""
    a = parse_args(args)
    cfg = _checkpoint_config(a.model)
    try:
        return a.fit_max_model_len(cfg)[1] if cfg is not None else None
    except ValueError:
        return None


def _fit_max_model_len(a, cfg):
    """Decide max_model_len before any replica starts (so the ingress reports it without loading weights): what one
    sequence can hold, never more than the cache; say so when that is below the checkpoint's context."""
    from common.errors import UserError

    if cfg is None:  # an s3:// model with max_model_len given: the replicas check it
        return a
    try:
        a, note = a.fit_max_model_len(cfg)
    except ValueError as e:
        raise UserError(f"serve args: {e}") from None
    if note:
        log.warning("%s", note)
    return a


def _check_licensing(a):
    """Say loudly whether users will be counted and where; with require_licensing, refuse to start without a key.
    The store is fixed here (absolute), so replicas never write relative to their own working directory."""
    from common.errors import UserError
    from serving.usage import licensing_status

    status = licensing_status(a.licensing_store)
    if a.require_licensing and not status.counting:
        raise UserError("serve args: require_licensing is set but HERD_LICENSING_KEY is not; set it (and "
                        "HERD_LICENSING_STORE) in the server's environment, or drop require_licensing")
    log.warning("%s", status.message)
    return a.model_copy(update={"licensing_store": status.store})


def _check_adapter(a) -> None:
    """Refuse, before anything starts, an adapter herd cannot merge or a served name the licence forbids: a
    fine-tuned Llama made available to users must be named "Llama..." (Llama 4 Community License, 1.b.i)."""
    from common.errors import UserError
    from licensing import require_llama_prefix
    from serving.lora import LoraAdapter, LoraError

    try:
        LoraAdapter.load(a.lora_adapter)
    except LoraError as e:
        raise UserError(f"serve args: lora_adapter: {e}") from None
    require_llama_prefix(a.model_name, distributed=True)


def _checkpoint_config(model: str):
    """The local checkpoint's TextConfig (config.json read once here), or None for s3:// or an unreadable folder."""
    from pathlib import Path

    from serving.config import ModelConfig

    if model.startswith("s3://") or not (Path(model) / "config.json").is_file():
        return None
    try:
        return ModelConfig.load(model).text
    except ValueError:
        return None
