"""`herd serve`: put a checkpoint (or the model a cluster file names) behind the OpenAI-compatible HTTP API.

It joins the local Ray cluster if one is running (else starts one on 127.0.0.1), deploys the Serve application
from `serving.app:build_app`, prints where it listens, and blocks until Ctrl-C or SIGTERM, which take the app
down and, when herd started the Ray cluster, every Ray process it started.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from common.errors import UserError


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
    app.command("serve")(serve_command)


def serve_command(
    target: str = typer.Argument(..., help="Checkpoint folder (HF layout) or a cluster YAML (see infra/clusters/)."),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds (0.0.0.0 to listen on every interface)."),
    port: Optional[int] = typer.Option(None, help="HTTP port (default: the cluster file's serving.port, else 8000)."),
    expert_parallel: Optional[int] = typer.Option(None, "--expert-parallel", min=1,
                                                  help="Ray workers to split the routed experts over."),
    api_keys_file: Optional[Path] = typer.Option(None, help="YAML mapping API keys to identities; none: no auth."),
    max_num_seqs: Optional[int] = typer.Option(None, min=1, help="Sequences a replica runs at once."),
    max_model_len: Optional[int] = typer.Option(None, min=16, help="Longest prompt + completion, tokens."),
    served_model_name: Optional[str] = typer.Option(None, help="Name clients use in `model`."),
    lora_adapter: Optional[Path] = typer.Option(None, help="PEFT LoRA adapter folder to serve (merged at load), "
                                                           "e.g. a fine-tune's output/adapter."),
    max_images_per_request: Optional[int] = typer.Option(None, min=0, max=64,
                                                         help="Images one request may carry (default 8; 0: none)."),
    image_url_allowed_host: Optional[list[str]] = typer.Option(
        None, "--image-url-allowed-host", help="A host http(s) image URLs may name (repeat for more; default: "
                                               "none, data: URLs only)."),
    require_licensing: bool = typer.Option(False, "--require-licensing",
                                           help="Refuse to start unless users are counted for the licence "
                                                "(HERD_LICENSING_KEY set)."),
    trust_user_field: Optional[bool] = typer.Option(
        None, "--trust-user-field/--no-trust-user-field",
        help="Count the body's `user` / X-User-Id as the licence's user (namespaced by the key's identity). "
             "Default: on without --api-keys-file, off with it."),
    ray_address: str = typer.Option("auto", help="Ray cluster to join; 'auto' joins a running local one or starts "
                                                 "one on 127.0.0.1, 'local' always starts a fresh one."),
) -> None:
    """Serve Llama 4 over an OpenAI-compatible HTTP API on Ray Serve (blocks; Ctrl-C stops it)."""
    args, default_port = _args_for(target)
    overrides = {"expert_parallel_size": expert_parallel, "max_num_seqs": max_num_seqs,
                 "max_model_len": max_model_len, "served_model_name": served_model_name,
                 "api_keys_file": str(api_keys_file) if api_keys_file else None,
                 "lora_adapter": str(lora_adapter.resolve()) if lora_adapter else None,
                 "trust_user_field": trust_user_field, "require_licensing": require_licensing or None,
                 "max_images_per_request": max_images_per_request,
                 "image_url_allowed_hosts": image_url_allowed_host or None}
    args.update({k: v for k, v in overrides.items() if v is not None})
    warning = exposure_warning(host, args.get("api_keys_file"))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    run_blocking(args, host, port or default_port, ray_address)


def exposure_warning(host: str, api_keys_file: str | None) -> str | None:
    """A loud line when the server would listen beyond this machine with no API keys (None otherwise)."""
    if api_keys_file or host in ("localhost", "::1") or host.startswith("127."):
        return None
    return (f"herd: WARNING: listening on {host}, reachable from other machines, with no API keys: anyone who can "
            "reach this port can use the model and name any user for the licence count. Pass --api-keys-file, or "
            "keep --host 127.0.0.1 behind your own authenticating proxy.")


def _args_for(target: str) -> tuple[dict, int]:
    """build_app arguments (and the default port) from a checkpoint folder or a cluster file."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        from cluster.render.serve import require_servable, serve_args
        from cluster.schema import load_cluster

        spec = load_cluster(path)
        require_servable(spec)
        return serve_args(spec), spec.serving.port
    if not path.is_dir():
        raise UserError(f"{target}: no such checkpoint folder; give a folder with config.json and *.safetensors "
                        "(e.g. from `herd checkpoint create`) or a cluster YAML")
    if not (path / "config.json").is_file():
        raise UserError(f"{target}: no config.json in this folder; it is not a Hugging Face checkpoint")
    return {"model": str(path.resolve())}, 8000


def run_blocking(args: dict, host: str, port: int, ray_address: str = "auto") -> None:
    """Deploy the app on a local Ray cluster (joined or started) and wait for Ctrl-C."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray's listeners on loopback
    from serving.app import build_app

    app = build_app(args)  # validates args (and reads the keys file) before Ray starts
    from serving.app import max_model_len_note

    note = max_model_len_note(args)
    if note:
        print(f"herd: {note}", flush=True)
    from serving.usage import licensing_status

    print(f"herd: {licensing_status(args.get('licensing_store')).message}", flush=True)
    import ray
    from ray import serve

    # SIGTERM (a process manager, `kill`) stops herd as Ctrl-C does: without this Python would exit at once and
    # the Ray processes herd started (GCS, raylet, its agents, Serve's actors) would outlive it.
    signal.signal(signal.SIGTERM, _interrupt)
    started = _join_or_start(ray, ray_address)
    signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installs its own (exit at once)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        try:
            serve.run(app, name="herd", route_prefix="/", blocking=False)
        except Exception as e:
            raise UserError(f"the model did not start: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}; "
                            "see the Ray logs (/tmp/ray/session_latest/logs/serve) for the cause", exit_code=1) from None
        # Flushed at once: under a process manager stdout is a file or pipe, and Ray's shutdown may not flush it.
        print(f"herd: serving at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops). Built with Llama.",
              flush=True)
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("herd: stopping", flush=True)
    finally:
        _stop(ray, serve, started)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(ray, serve, started: bool) -> None:
    """Take the app down; if herd started the Ray cluster, stop Serve and every Ray process it started."""
    import psutil

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ours = psutil.Process().children(recursive=True) if started else []
    steps = [lambda: serve.delete("herd")] + ([serve.shutdown] if started else []) + [ray.shutdown]
    for step in steps:
        try:
            step()
        except Exception as e:  # keep going: the later steps free more
            print(f"herd: while stopping: {e.__class__.__name__}", file=sys.stderr, flush=True)
    # ray.shutdown stops the GCS and raylet it started; the raylet's agents (dashboard, runtime env) are left
    # orphaned and linger. herd started them, so herd stops them.
    _terminate([p for p in ours if p.is_running()])


def _terminate(procs, grace_s: float = 10.0) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _join_or_start(ray, address: str) -> bool:
    """Join the cluster at `address` (False) or start a local one (True: herd owns it and stops it)."""
    if address != "local":
        try:
            ray.init(address=address, logging_level="WARNING")
            return False
        except ConnectionError:
            if address != "auto":
                raise UserError(f"no Ray cluster at {address}; start one (`ray start --head`) or pass "
                                "--ray-address local") from None
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    except Exception as e:  # e.g. the raylet missed Ray's fixed 30 s startup window on an overloaded machine
        raise UserError(f"could not start a local Ray cluster ({str(e).splitlines()[0][:200]}); retry, or start "
                        "one with `ray start --head` and run herd serve again to join it", exit_code=1) from None
    return True
