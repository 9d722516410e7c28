"""`python -m finetune JOB.yaml`: run a fine-tuning job on the Ray cluster at RAY_ADDRESS (or a local one).

This is what `ray job submit --working-dir . -- python -m finetune JOB.yaml` runs. Mistakes in the job file
print one line and exit 2.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m finetune JOB.yaml", file=sys.stderr)
        return 2
    from finetune.job import default_environment
    from finetune.schema import JobFileError, load_job

    default_environment()  # before ray is imported: Ray reads some of it at import
    try:
        job = load_job(args[0])
    except JobFileError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    import ray

    from finetune.job import preflight, run

    try:
        preflight(job)
    except JobFileError as e:
        print(f"finetune: error: {args[0]}: {e}", file=sys.stderr)
        return 2
    ray.init(log_to_driver=True)
    run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
