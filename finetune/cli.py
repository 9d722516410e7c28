"""`herd` subcommands for finetune/ (filled in by the finetune work)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
