"""`herd license ...`: ingest activity logs, answer the licence's 700M question, check a model folder's notices.

Exit codes of `report`: 0 below 700M, 1 above, 3 cannot tell (bounds straddle 700M, or no data for the month),
2 invalid input. `check`: 0 compliant, 1 problems found, 2 invalid input.
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Optional

import typer

license_app = typer.Typer(name="license", no_args_is_help=True,
                          help="Count monthly active users against the Llama 4 licence's 700M threshold; "
                               "check the licence's notices.")

_CONFIG = typer.Option(None, "--config", help="Licensing config YAML (store, key, columns, lg_k, alert levels).")
_STORE = typer.Option(None, "--store", help="Local dir or s3://bucket/prefix (default: $HERD_LICENSING_STORE, "
                                            "else ./herd-data/licensing).")


def _exit(code: int) -> None:
    """End the command with `code`. SystemExit, not typer.Exit: click in non-standalone mode (how herd.cli.main
    runs the app) turns typer.Exit into a return value that main does not pass on."""
    raise SystemExit(code)


def _setup(config_path, store_uri):
    from licensing.config import load_config
    from licensing.store import open_store

    cfg = load_config(config_path)
    return cfg, open_store(store_uri or cfg.store, cfg.endpoint_url)


def _date(value: Optional[str], flag: str) -> Optional[date]:
    from common.errors import UserError

    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a date; write it as YYYY-MM-DD, e.g. 2025-04-05") from None


@license_app.command("ingest")
def ingest(files: list[str] = typer.Argument(..., help="Parquet (*.parquet) or JSON-lines (*.jsonl) logs, "
                                                       "local paths or s3://bucket/key."),
           config: Optional[str] = _CONFIG, store: Optional[str] = _STORE,
           verbose: bool = typer.Option(False, "--verbose", "-v", help="Print each chunk as it is acknowledged.")):
    """Hash user IDs with the licensing key and store events and sketches; safe to re-run (idempotent)."""
    from licensing.ingest import check_key_matches, ingest_file
    from licensing.keyed_hash import load_key

    cfg, st = _setup(config, store)
    key = load_key(cfg.key.get_secret_value() if cfg.key else None)
    check_key_matches(st, key)

    def ack(marker: dict) -> None:
        if verbose:
            typer.echo(f"acked {marker['source']} {marker['unit']} {marker['start']}-{marker['end']} "
                       f"({marker['events']} events)", err=False)

    for f in files:
        r = ingest_file(st, f, key, cfg, on_ack=ack)
        typer.echo(f"{r['source']}: {r['events']:,} new events stored in {st.uri}")


@license_app.command("report")
def report(release_date: Optional[str] = typer.Option(None, "--release-date", help="Llama release date, "
           "YYYY-MM-DD; the licence asks about the calendar month before it (default: today, i.e. last month)."),
           as_of: Optional[str] = typer.Option(None, "--as-of",
                                               help="Day the running view ends (default: today, UTC)."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
           plot: Optional[str] = typer.Option(None, "--plot", help="Also write the monthly trend chart to this PNG."),
           audit: bool = typer.Option(False, "--audit", help="Also count the asked month exactly with Ray Data "
                                                             "(uses the Ray cluster at $RAY_ADDRESS or a local one)."),
           config: Optional[str] = _CONFIG, store: Optional[str] = _STORE):
    """Answer: were monthly active users above 700M in the month before the release date? Plus the trend."""
    import json

    from licensing.ledger import load_sketches
    from licensing.report import build_report, format_table, month_days

    cfg, st = _setup(config, store)
    today = datetime.now(timezone.utc).date()
    rel = _date(release_date, "--release-date") or today
    asof = _date(as_of, "--as-of") or today
    rep = build_report(load_sketches(st, cfg.lg_k), rel, asof, cfg.alert_levels)
    if audit:
        rep["audit"] = _audit(st, rep["question"]["month"], month_days)
    if plot:
        from licensing.plot import plot_trend

        plot_trend(rep, plot)
    typer.echo(json.dumps(rep, indent=2) if as_json else format_table(rep))
    _exit(rep["question"]["exit_code"])


def _audit(st, month: str, month_days) -> dict:
    import ray

    from licensing.audit import exact_counts

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        return {"month": month, **exact_counts(st, *month_days(month), [month])}
    finally:
        if started:
            ray.shutdown()


@license_app.command("check")
def check(folder: str = typer.Argument(..., help="Model or adapter folder to check."),
          distributed: bool = typer.Option(True, "--distributed/--internal", help="Whether the model is "
                                           "distributed or made available (then the name and 'Built with Llama' "
                                           "rules apply too)."),
          name: Optional[str] = typer.Option(None, "--name", help="The model's published name (default: the "
                                                                 "folder's name).")):
    """Check a model folder for the NOTICE text, a copy of the agreement, the "Llama" name prefix."""
    from licensing.compliance import check_model_dir

    problems = check_model_dir(folder, distributed, name)
    if not problems:
        typer.echo(f"{folder}: meets the Llama 4 licence's notice duties")
        _exit(0)
    for p in problems:
        typer.echo(f"{folder}: {p}")
    _exit(1)


@license_app.command("compact")
def compact_cmd(config: Optional[str] = _CONFIG, store: Optional[str] = _STORE):
    """Merge all flushed sketches into one snapshot so reports read a few objects, not thousands."""
    from licensing.merge import compact

    _, st = _setup(config, store)
    rec = compact(st)
    typer.echo("nothing new to merge" if rec is None else
               f"snapshot {rec['seq']} covers {len(rec['covers'])} commits ({rec['groups']} product-affiliate-days)")


def register(app: typer.Typer) -> None:
    """Add `herd license ...` to the `herd` app."""
    app.add_typer(license_app, name="license")
