"""Submit a job file to a Ray cluster through Ray's job SDK and follow its log (`herd finetune submit`).

The job runs `python -m finetune job.yaml` on the cluster, as `ray job submit --working-dir` would. What travels:
a working directory holding the validated job file and herd's packages (no tests, no caches), so the cluster
needs the same Python dependencies installed but no copy of this repository. (One working directory rather than
`py_modules` plus a working directory: with both, Ray 2.60 lost the working-directory package before Ray Data's
tasks started.)
"""
from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from herd.errors import UserError

PACKAGES = ("finetune", "licensing", "llama4", "herd")
REPO = Path(__file__).resolve().parent.parent


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, bad URL, missing auth token: all fixable by the user
        raise UserError(f"cannot reach the Ray job server at {address}: {e}. Pass the dashboard URL "
                        "(e.g. --address http://HEAD:8265); with token auth, set RAY_AUTH_MODE=token", 1) from None


def submit(job_path: str | Path, address: str, follow: bool = True, out=sys.stdout) -> tuple[str, str]:
    """Validate, submit, and (by default) stream the log until the job ends; returns (job id, final status)."""
    from finetune.schema import JobFileError, load_job

    try:
        job = load_job(job_path)
    except JobFileError as e:
        raise UserError(str(e)) from None
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="herd-submit-") as tmp:
        shutil.copy(job_path, Path(tmp) / "job.yaml")
        for pkg in PACKAGES:
            shutil.copytree(REPO / pkg, Path(tmp) / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        submission_id = client.submit_job(
            entrypoint="python -m finetune job.yaml",
            submission_id=f"finetune-{job.name}-{int(time.time())}",
            runtime_env={"working_dir": tmp},
            metadata={"herd": "finetune", "run": job.name},
        )
    print(f"submitted {submission_id} to {address}", file=out, flush=True)
    if not follow:
        return submission_id, "PENDING"
    status = asyncio.run(_follow(client, submission_id, out))
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        raise UserError(f"job {submission_id} ended {status}: {info.message or 'see the log above'}", 1)
    return submission_id, status


async def _follow(client, submission_id: str, out) -> str:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", file=out, flush=True)
    status = client.get_job_status(submission_id)
    for _ in range(100):  # the log stream closes slightly before the status settles
        if status.is_terminal():
            break
        await asyncio.sleep(0.2)
        status = client.get_job_status(submission_id)
    return str(status.value)
