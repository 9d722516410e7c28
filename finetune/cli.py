"""`herd finetune ...`: check a job file, or submit it to a Ray cluster and follow its log."""
from __future__ import annotations

import typer

finetune_app = typer.Typer(help="LoRA fine-tuning jobs on Ray Train with DeepSpeed.", no_args_is_help=True)


@finetune_app.command("submit")
def submit_cmd(
    job_file: str = typer.Argument(..., help="The job file (YAML); see finetune/README.md."),
    address: str = typer.Option(..., "--address", help="Ray dashboard/job server URL, e.g. http://HEAD:8265."),
    no_follow: bool = typer.Option(False, "--no-follow", help="Return after submitting; do not stream the log."),
) -> None:
    """Submit JOB_FILE to the cluster at --address (Ray's job SDK) and stream its log until it ends."""
    from finetune.submit import submit

    submit(job_file, address, follow=not no_follow)


@finetune_app.command("check")
def check_cmd(job_file: str = typer.Argument(..., help="The job file (YAML).")) -> None:
    """Validate JOB_FILE (schema, bounds, licence naming rule) without running anything."""
    from finetune.schema import load_job

    job = load_job(job_file)  # a JobFileError is a UserError: `herd` prints it as one line
    typer.echo(f"{job_file}: ok ({job.name}: ZeRO-{job.deepspeed.zero_stage}, {job.resources.workers} workers, "
               f"adapter {job.adapter.name})")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
    app.add_typer(finetune_app, name="finetune")
