"""Stay inside the Llama 4 Community License: count monthly active users against 700M, check the other duties.

Public surface:
- `MauTracker`: the live per-request recorder serving replicas use (tracker.py).
- `NOTICE_TEXT`, `check_model_dir`, `require_llama_prefix`, `write_notice`: section 1.b duties (compliance.py).
- `demo_report(store_dir)`: the demo's ingest-and-report in one call (demo.py).
The `herd license ...` commands live in cli.py; how it works is in README.md next to this file.
"""
from licensing.compliance import NOTICE_TEXT, check_model_dir, require_llama_prefix, write_notice
from licensing.tracker import MauTracker


def demo_report(store_dir: str, **kwargs) -> str:
    """Ingest a generated 3-month log into `store_dir` and return the report table (see demo.py)."""
    from licensing.demo import demo_report as _demo

    return _demo(store_dir, **kwargs)


__all__ = ["MauTracker", "NOTICE_TEXT", "check_model_dir", "require_llama_prefix", "write_notice", "demo_report"]
