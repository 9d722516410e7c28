"""`herd plan` and `herd render`: check a cluster file's capacity, then write the configs to deploy it.

Exit codes of `herd plan`: 0 the plan fits, 1 it does not (reasons and fixes printed), 2 the file is invalid
(one line naming the YAML path, the bad value and the fix).
"""
from __future__ import annotations

from pathlib import Path

import typer

from common.errors import UserError


def register(app: typer.Typer) -> None:
    """Add `herd plan` and `herd render` to the `herd` app."""

    @app.command("plan")
    def plan_cmd(
        cluster_file: Path = typer.Argument(None, help="Cluster YAML (see infra/clusters/)."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
        throughput: float = typer.Option(None, "--throughput",
                                         help="Expected tokens/s over the whole cluster, for a cost per million "
                                              "tokens estimate."),
        placement_out: Path = typer.Option(None, "--placement-out",
                                           help="Write the expert placement map (JSON) the engine reads."),
    ) -> None:
        """Plan a cluster: does the model fit, with how much context, concurrency and cost."""
        _require(cluster_file=cluster_file)
        if throughput is not None and not throughput > 0:
            raise UserError(f"--throughput: {throughput:g} tokens/s; give the expected tokens per second over the "
                            "whole cluster, a number above 0")
        from cluster.planner import plan
        from cluster.report import format_plan
        from cluster.schema import load_cluster

        spec = load_cluster(cluster_file)
        try:
            p = plan(spec, throughput=throughput)
        except UserError as e:  # e.g. a placement file that does not match: name the cluster file too
            raise UserError(f"{cluster_file}: {e}", exit_code=e.exit_code) from None
        typer.echo(p.to_json() if as_json else format_plan(p, str(cluster_file)))
        if placement_out is not None:
            p.placement.save(placement_out)
            if not as_json:
                typer.echo(f"wrote the expert placement to {placement_out}")
        if not p.fits:
            raise SystemExit(1)  # herd.cli.main ignores the return value typer.Exit becomes here

    @app.command("render")
    def render_cmd(
        cluster_file: Path = typer.Argument(None, help="Cluster YAML (see infra/clusters/)."),
        target: str = typer.Option(None, "--target",
                                   help="ray-cluster, kuberay-service, kuberay-job or serve."),
        out: Path = typer.Option(None, "-o", "--output", help="File to write."),
        job: str = typer.Option(None, "--job", help="Fine-tune job file the RayJob runs (kuberay-job only)."),
    ) -> None:
        """Write a deployable config rendered from the cluster file, validated before it is written."""
        _require(cluster_file=cluster_file, target=target, out=out)
        from cluster.render import TARGETS, render
        from cluster.schema import did_you_mean, load_cluster

        if target not in TARGETS:
            raise UserError(f"--target: unknown target {target!r}{did_you_mean(target, TARGETS)}; choose one of: "
                            f"{', '.join(TARGETS)}")
        spec = load_cluster(cluster_file)
        try:
            text = render(spec, target, source=str(cluster_file), job=job)
        except UserError as e:  # name the file, as load_cluster's errors do
            raise UserError(f"{cluster_file}: {e}", exit_code=e.exit_code) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {target} config to {out}")
        if target in ("serve", "kuberay-service") and spec.provider.cloud != "local" and not spec.serving.api_keys_file:
            typer.echo(f"herd: WARNING: {out} serves on 0.0.0.0 with no API keys: anyone who can reach the port can "
                       "use the model and name any user for the licence count. Set serving.api_keys_file, or put "
                       "an authenticating proxy in front.", err=True)


_HOW = {"cluster_file": "give the cluster YAML, e.g. infra/clusters/local.yaml",
        "target": "add --target ray-cluster, kuberay-service, kuberay-job or serve",
        "out": "add -o FILE"}


def _require(**given: object) -> None:
    """Required arguments checked here, so a missing one is a one-line error rather than a usage traceback."""
    for name, value in given.items():
        if value is None:
            raise UserError(f"missing {name.replace('_', ' ')}: {_HOW[name]}")
