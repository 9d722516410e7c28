"""Submit a job file to a Ray cluster through Ray's job SDK and follow its log (`herd finetune submit`).

The job runs `python -m finetune --job-from-env` on the cluster, with the validated job file's text in the job's
environment (`HERD_FINETUNE_JOB`; job files hold no secrets). The cluster runs the herd installed on its nodes,
as a Ray cluster image does. (Shipping the file in a runtime-env working directory was tried: on Ray 2.60 the
working-directory package was intermittently gone from the GCS by the time Ray Data's tasks started.)
To ship code as well, use `ray job submit --working-dir . -- python -m finetune JOB.yaml`.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from common.errors import UserError

JOB_ENV = "HERD_FINETUNE_JOB"


def _auth_headers() -> dict[str, str]:
    """Ray's token-auth header when a token is configured (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).

    Sent explicitly because Ray decides once per process whether auth is on; a process that imported Ray before
    RAY_AUTH_MODE=token was set would otherwise send no token. The token itself is never printed.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as e:  # connection refused, bad URL, missing auth token: all fixable by the user
        raise UserError(f"cannot reach the Ray job server at {address}: {e}. Pass the dashboard URL "
                        "(e.g. --address http://HEAD:8265); with token auth, set RAY_AUTH_MODE=token", 1) from None


def submit(job_path: str | Path, address: str, follow: bool = True, out=sys.stdout) -> tuple[str, str]:
    """Validate, submit, and (by default) stream the log until the job ends; returns (job id, final status)."""
    from finetune.schema import load_job

    job = load_job(job_path)  # a JobFileError is a UserError
    client = _client(address)
    submission_id = client.submit_job(
        entrypoint="python -m finetune --job-from-env",
        submission_id=f"finetune-{job.name}-{int(time.time())}",
        runtime_env={"env_vars": {JOB_ENV: Path(job_path).read_text()}},
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
