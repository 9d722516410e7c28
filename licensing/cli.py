"""`herd` subcommands for licensing/ (filled in by the licensing work)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
