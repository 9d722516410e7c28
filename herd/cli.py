"""The `herd` command: one typer app; each area (llama4, cluster, serving, finetune, licensing) adds its commands.

Areas register commands from their own `cli.py` with a `register(app)` function and import their heavy
dependencies inside the command bodies, so `herd --help` stays fast.
"""
from __future__ import annotations

import sys

import typer

from herd.errors import UserError

app = typer.Typer(
    name="herd",
    help="Run Llama 4 on your own Ray cluster: plan, serve, fine-tune, and stay inside its licence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    import cluster.cli
    import finetune.cli
    import licensing.cli
    import llama4.cli
    import serving.cli

    for area in (llama4.cli, cluster.cli, serving.cli, finetune.cli, licensing.cli):
        area.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes become one line on stderr and an exit code, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return e.exit_code
    except (typer.Exit, SystemExit) as e:  # typer.Exit carries the command's own exit code
        code = getattr(e, "exit_code", None)
        if code is None:
            code = e.code if isinstance(e, SystemExit) else 0
        return int(code or 0)
    except typer.Abort:
        print("herd: aborted", file=sys.stderr)
        return 130
    except Exception as e:  # click usage errors (bad flag, missing argument) arrive here
        import click

        if isinstance(e, click.exceptions.UsageError):
            print(f"herd: error: {e.format_message()}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
