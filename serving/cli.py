"""`herd` subcommands for serving/ (filled in by the serving work)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
