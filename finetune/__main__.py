"""`python -m finetune JOB.yaml`: run a fine-tuning job on the Ray cluster at RAY_ADDRESS (or a local one).

This is what `ray job submit --working-dir . -- python -m finetune JOB.yaml` runs; `herd finetune submit` runs
`python -m finetune --job-from-env` with the file's text in HERD_FINETUNE_JOB. Mistakes in the job file print
one line and exit 2.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or (args[0].startswith("-") and args[0] != "--job-from-env"):
        print("usage: python -m finetune JOB.yaml  (or --job-from-env)", file=sys.stderr)
        return 2
    import os

    import yaml

    from finetune.job import default_environment
    from common.errors import UserError
    from finetune.schema import load_job, parse_job
    from finetune.submit import JOB_ENV

    default_environment()  # before ray is imported: Ray reads some of it at import
    try:
        if args[0] == "--job-from-env":
            job = parse_job(yaml.safe_load(os.environ.get(JOB_ENV, "")), source=JOB_ENV)
        else:
            job = load_job(args[0])
    except UserError as e:  # JobFileError, or the licence's naming rule
        print(f"finetune: error: {e}", file=sys.stderr)
        return e.exit_code
    import ray

    from finetune.job import preflight, run

    try:
        preflight(job)
    except UserError as e:
        print(f"finetune: error: {args[0]}: {e}", file=sys.stderr)
        return e.exit_code
    ray.init(log_to_driver=True)
    run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
