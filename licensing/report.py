"""The licence's question and the running view, computed from the stored sketches.

Section 2 of the Llama 4 Community License asks whether, on a release date, the monthly active users of the
products or services of the licensee *or its affiliates* exceeded 700 million in the preceding calendar month. So
the deciding figure is the company-wide distinct count (every product, every affiliate) over the calendar month
before the release date (UTC days). Its 95% bounds give the verdict: below (exit 0), above (exit 1), or bounds
straddling 700M: cannot tell (exit 3). No events at all in that month is also "cannot tell": absence of data is
not evidence of few users.

The running view adds the current month so far and the trailing 30 days, alert levels (reached when the upper 95%
bound crosses a level: alerts should come early), and a linear-trend forecast over the complete months.
"""
from __future__ import annotations

from datetime import date, timedelta

from licensing.forecast import linear_forecast, month_add
from licensing.sketch import Estimate, SketchSet, rse

THRESHOLD = 700_000_000
EXIT_BELOW, EXIT_ABOVE, EXIT_INVALID, EXIT_CANNOT_TELL = 0, 1, 2, 3
_EPOCH = date(1970, 1, 1)


def day_number(d: date) -> int:
    return (d - _EPOCH).days


def month_of(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def month_days(month: str) -> tuple[int, int]:
    """First and last day number (inclusive) of a YYYY-MM month."""
    y, m = map(int, month.split("-"))
    first = date(y, m, 1)
    ny, nm = map(int, month_add(month, 1).split("-"))
    return day_number(first), day_number(date(ny, nm, 1)) - 1


def _est(e: Estimate) -> dict:
    return {"estimate": round(e.value), "low_95": round(e.low), "high_95": round(e.high),
            "pct_of_threshold": round(100 * e.value / THRESHOLD, 6)}


def period_figures(sketches: SketchSet, lo: int, hi: int) -> dict:
    """Distinct users over days [lo, hi]: company-wide, per product, per affiliate, each with 95% bounds."""
    in_range = [k for k in sketches.groups if lo <= k[2] <= hi]
    products = sorted({k[0] for k in in_range})
    affiliates = sorted({k[1] for k in in_range})
    company = Estimate.of(sketches.union(lambda k: lo <= k[2] <= hi))
    return {
        "company": _est(company),
        "products": {p: _est(Estimate.of(sketches.union(lambda k, p=p: k[0] == p and lo <= k[2] <= hi)))
                     for p in products},
        "affiliates": {a or "(licensee)": _est(Estimate.of(sketches.union(
            lambda k, a=a: k[1] == a and lo <= k[2] <= hi))) for a in affiliates},
        "days_with_data": len({k[2] for k in in_range}),
    }


def verdict(fig: dict) -> tuple[str, int]:
    """below / above / cannot tell, from the company figure's 95% bounds against 700M."""
    if fig["days_with_data"] == 0:
        return "cannot tell: no events recorded in that month", EXIT_CANNOT_TELL
    c = fig["company"]
    if c["high_95"] <= THRESHOLD:
        return "below 700M", EXIT_BELOW
    if c["low_95"] > THRESHOLD:
        return "above 700M: request a license from Meta", EXIT_ABOVE
    return "cannot tell: the 95% bounds straddle 700M (run `herd license report --audit` for the exact count)", \
        EXIT_CANNOT_TELL


def monthly_history(sketches: SketchSet) -> list[tuple[str, dict]]:
    """Company-wide figure for every month that has data, oldest first."""
    months = sorted({month_of(_EPOCH + timedelta(days=k[2])) for k in sketches.groups})
    return [(m, period_figures(sketches, *month_days(m))["company"]) for m in months]


def alert_level(figures: list[dict], levels: list[float]) -> float | None:
    """The highest configured level (percent of 700M) reached by any figure's upper 95% bound."""
    reached = [lv for lv in levels for f in figures if f["high_95"] >= lv / 100 * THRESHOLD]
    return max(reached) if reached else None


def build_report(sketches: SketchSet, release_date: date, as_of: date, levels: list[float]) -> dict:
    """Everything `herd license report` shows, as plain data (the --json output)."""
    if release_date < date(1970, 2, 1):
        from common.errors import UserError

        raise UserError(f"release date {release_date} is before any possible data")
    asked = month_add(month_of(release_date), -1)
    fig = period_figures(sketches, *month_days(asked))
    text, code = verdict(fig)
    current = period_figures(sketches, day_number(as_of.replace(day=1)), day_number(as_of))
    trailing = period_figures(sketches, day_number(as_of) - 29, day_number(as_of))
    history = monthly_history(sketches)
    complete = [(m, f["estimate"]) for m, f in history if m < month_of(as_of)]
    return {
        "threshold": THRESHOLD,
        "confidence": 0.95,
        "relative_standard_error": rse(sketches.lg_k),
        "question": {"release_date": release_date.isoformat(), "month": asked, "verdict": text, "exit_code": code,
                     **fig},
        "running": {
            "as_of": as_of.isoformat(),
            "current_month": {"month": month_of(as_of), **current},
            "trailing_30_days": {"from": (as_of - timedelta(days=29)).isoformat(), "to": as_of.isoformat(),
                                 **trailing},
            "alert_levels": levels,
            "alert": alert_level([current["company"], trailing["company"]], levels),
            "forecast": linear_forecast(complete, THRESHOLD),
        },
        "history": [{"month": m, **f} for m, f in history],
    }


def _row(name: str, f: dict) -> str:
    return (f"  {name:<28} {f['estimate']:>14,} {f['low_95']:>14,} {f['high_95']:>14,} "
            f"{f['pct_of_threshold']:>10.4f}%")


def _block(title: str, fig: dict) -> list[str]:
    lines = [title, f"  {'scope':<28} {'estimate':>14} {'95% low':>14} {'95% high':>14} {'of 700M':>11}",
             _row("company total", fig["company"])]
    lines += [_row(f"product {p}", f) for p, f in fig["products"].items()]
    lines += [_row(f"affiliate {a}", f) for a, f in fig["affiliates"].items()]
    return lines


def format_table(rep: dict) -> str:
    """The terminal table: the licence's question first, then the running view."""
    q, run = rep["question"], rep["running"]
    lines = _block(f"Llama 4 licence, section 2: monthly active users in {q['month']} "
                   f"(the calendar month before release date {q['release_date']}), UTC", q)
    lines.append(f"  verdict: {q['verdict']}")
    lines.append("")
    lines += _block(f"Current month {run['current_month']['month']} up to {run['as_of']}", run["current_month"])
    t = run["trailing_30_days"]
    lines.append(_row(f"trailing 30 days {t['from']}..{t['to']}", t["company"]))
    alert = run["alert"]
    lines.append(f"  alert: {'none' if alert is None else f'{alert:g}% of 700M reached (upper 95% bound)'}"
                 f" (levels {', '.join(f'{x:g}%' for x in run['alert_levels'])})")
    lines.append(f"  forecast: {run['forecast']['note']}")
    if "audit" in rep:
        a = rep["audit"]
        lines.append(f"  exact audit of {a['month']} (Ray Data): {a['company']:,} distinct users")
    return "\n".join(lines)
