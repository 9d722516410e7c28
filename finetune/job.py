"""Run one fine-tuning job on the Ray cluster this process is attached to (what `python -m finetune` does).

Driver side: read the data with Ray Data, start a TorchTrainer whose workers run train_loop.py, recover from
worker failures (FailureConfig) and resume a resubmitted run from its storage, then write the outputs.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Ray Train reports cost about 1.6 s each at the default health-check interval.
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def default_environment() -> None:
    """Environment the job (and the Ray workers it starts) needs, unless the user set it."""
    # DeepSpeed compiles its CPU ops once; keep them in the repo's ignored cache, shared by later runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)


def worker_env(job) -> dict[str, str]:
    env = {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if job.resources.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
    if "HERD_CACHE_DIR" in os.environ:  # herd's cache root (serving/expert_parallel/s3.py cache_root)
        env["HERD_CACHE_DIR"] = os.environ["HERD_CACHE_DIR"]
    from finetune.storage import Credentials

    # AWS credentials go to the workers in their runtime environment (held by Ray's GCS for the run's lifetime),
    # never in train_loop_config: Ray Train stores that with the run and shows it in its dashboard.
    env.update(Credentials.from_env())
    return env


def loop_config(job) -> dict:
    """What every training worker receives as `config`: the job, and nothing secret."""
    return {"job": job.model_dump(mode="json")}


def _trainer_class():
    """Ray Train's TorchTrainer, minus Ray 2.60's placement-group cleaner.

    The cleaner asks Ray's state API whether the run's controller is alive. With several Ray clusters on one
    machine (shared dev boxes, parallel test sessions) the state API connects to the newest cluster, does not find
    the controller there, and removes this run's placement group, killing healthy workers mid-step. Without the
    cleaner, a crashed controller's placement group is still freed when the job's driver exits.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # a Ray without the cleaner
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def build_trainer(job):
    """The TorchTrainer for a job (not started)."""
    import ray.train

    from finetune.data import tokenized_dataset
    from finetune.storage import filesystem
    from finetune.train_loop import train_loop_per_worker

    import ray.data

    # Progress bars of a few-row read drown the training progress lines in the job log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, storage = filesystem(job.checkpoint.storage_path, job.s3)
    res = job.resources
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config(job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker}
                                                                  if res.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.checkpoint.keep),
            worker_runtime_env={"env_vars": worker_env(job)}),
        # Tokenised once here (parallel Ray Data tasks) and kept in the object store; every worker reads the
        # examples and keeps its own share in a global order (data.py), so the data position in a checkpoint
        # means the same batches after a restart or on a resubmission.
        datasets={"train": tokenized_dataset(job).materialize()},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def preflight(job) -> None:
    """Refuse, before any worker starts, a job whose inputs are not where the file says (JobFileError)."""
    from finetune.schema import JobFileError
    from finetune.storage import exists

    where = f" (S3 endpoint {job.s3.endpoint_url})" if job.s3.endpoint_url else ""
    if not exists(job.base_model.rstrip("/") + "/config.json", job.s3):
        raise JobFileError(f"base_model: no Hugging Face checkpoint at {job.base_model}{where} (config.json is "
                           "missing); point it at a Llama 4 checkpoint folder")
    if not exists(job.dataset.path, job.s3):
        raise JobFileError(f"dataset.path: {job.dataset.path}{where} does not exist; fix the path or upload the data")
    from finetune.checkpointing import check_resume

    check_resume(job)  # a resubmitted run must keep its checkpoints' settings (read before anything is unpickled)


def run(job) -> str:
    """Check inputs, train, then write outputs; returns the output folder's URI."""
    from finetune.output import write_outputs

    default_environment()
    preflight(job)
    result = build_trainer(job).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"job {job.name} finished without a checkpoint; see the log above")
    with result.checkpoint.as_directory() as d:
        uri = write_outputs(job, d)
    print(f"[finetune] done: adapter, NOTICE, metrics.json and loss.png under {uri}", flush=True)
    return uri
