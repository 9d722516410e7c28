"""LoRA fine-tuning of Llama 4 on Ray Train with DeepSpeed ZeRO, run as `python -m finetune JOB.yaml`.

Modules: schema (the job file), data (Ray Data -> tokenised examples), model (PEFT LoRA on transformers' Llama 4),
train_loop (what each worker runs), checkpointing, output, job (the driver), submit/cli (`herd finetune`).
"""
