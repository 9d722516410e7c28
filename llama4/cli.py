"""`herd checkpoint ...`: make small Llama 4 checkpoints in the released Hugging Face layout."""
from __future__ import annotations

from pathlib import Path

import typer

from common.errors import UserError


def register(app: typer.Typer) -> None:
    """Add `herd checkpoint` to the `herd` app."""
    ckpt = typer.Typer(help="Make and inspect Llama 4 checkpoints in the Hugging Face layout.", no_args_is_help=True)

    @ckpt.command("create")
    def create(
        out_dir: Path = typer.Argument(..., help="Folder to write the checkpoint into (created)."),
        preset: str = typer.Option(..., "--preset", help="Preset name, e.g. scout-tiny, maverick-tiny."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
        force: bool = typer.Option(False, "--force", help="Overwrite a non-empty folder."),
    ) -> None:
        """Write a checkpoint (config, sharded safetensors, tokenizer, chat template) for a preset."""
        from llama4.checkpoint import create_checkpoint
        from llama4.presets import get_preset

        try:
            get_preset(preset)
        except KeyError as e:
            raise UserError(f"--preset: {e.args[0]}") from None
        try:
            path = create_checkpoint(preset, out_dir, seed=seed, overwrite=force)
        except (ValueError, FileExistsError) as e:
            raise UserError(str(e)) from None
        typer.echo(f"wrote {preset} checkpoint to {path}")

    app.add_typer(ckpt, name="checkpoint")
