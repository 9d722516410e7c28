"""`herd` subcommands for cluster/ (filled in by the cluster work)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `herd` app."""
