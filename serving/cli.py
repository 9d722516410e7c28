"""`herd serve`: put a checkpoint (or the model a cluster file names) behind the OpenAI-compatible HTTP API.

It joins the local Ray cluster if one is running (else starts one on 127.0.0.1), deploys the Serve application
from `serving.app:build_app`, prints where it listens, and blocks until Ctrl-C, which takes the app down.
"""
from __future__ import annotations

import os
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
    ray_address: str = typer.Option("auto", help="Ray cluster to join; 'auto' joins a running local one or starts "
                                                 "one on 127.0.0.1, 'local' always starts a fresh one."),
) -> None:
    """Serve Llama 4 over an OpenAI-compatible HTTP API on Ray Serve (blocks; Ctrl-C stops it)."""
    args, default_port = _args_for(target)
    overrides = {"expert_parallel_size": expert_parallel, "max_num_seqs": max_num_seqs,
                 "max_model_len": max_model_len, "served_model_name": served_model_name,
                 "api_keys_file": str(api_keys_file) if api_keys_file else None,
                 "lora_adapter": str(lora_adapter.resolve()) if lora_adapter else None}
    args.update({k: v for k, v in overrides.items() if v is not None})
    run_blocking(args, host, port or default_port, ray_address)


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
    import ray
    from ray import serve

    _join_or_start(ray, ray_address)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(app, name="herd", route_prefix="/", blocking=False)
    except Exception as e:
        raise UserError(f"the model did not start: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}; "
                        "see the Ray logs (/tmp/ray/session_latest/logs/serve) for the cause", exit_code=1) from None
    # Flushed at once: under a process manager stdout is a file or pipe, and Ray's shutdown may not flush it.
    print(f"herd: serving at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops). Built with Llama.",
          flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("herd: stopping")
    finally:
        serve.delete("herd")


def _join_or_start(ray, address: str) -> None:
    if address != "local":
        try:
            ray.init(address=address, logging_level="WARNING")
            return
        except ConnectionError:
            if address != "auto":
                raise UserError(f"no Ray cluster at {address}; start one (`ray start --head`) or pass "
                                "--ray-address local") from None
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    except Exception as e:  # e.g. the raylet missed Ray's fixed 30 s startup window on an overloaded machine
        raise UserError(f"could not start a local Ray cluster ({str(e).splitlines()[0][:200]}); retry, or start "
                        "one with `ray start --head` and run herd serve again to join it", exit_code=1) from None
