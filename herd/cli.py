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
        # standalone_mode=False: click returns a command's exit code instead of calling sys.exit itself.
        rv = app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except typer.Abort:
        print("herd: aborted", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors (bad flag, missing argument, wrong type) come from the click copy typer ships; they carry
        # format_message() and exit_code, which is all we need from them.
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"herd: error: {' '.join(e.format_message().split())}", file=sys.stderr)
            return int(e.exit_code)
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
