"""When would monthly active users cross 700M? A least-squares line through the complete months' estimates.

Deliberately simple: a linear trend is easy to explain to a compliance reviewer, and with the handful of months a
company usually has, anything fancier fits noise. It says "no crossing" when the trend is flat or falling.
"""
from __future__ import annotations

import math

import numpy as np


def month_add(month: str, k: int) -> str:
    """'2025-03' plus k months."""
    y, m = map(int, month.split("-"))
    i = y * 12 + (m - 1) + k
    return f"{i // 12:04d}-{i % 12 + 1:02d}"


def month_index(month: str) -> int:
    y, m = map(int, month.split("-"))
    return y * 12 + m - 1


def linear_forecast(history: list[tuple[str, float]], threshold: float, horizon_months: int = 120) -> dict:
    """Fit value = a + b * month over `history` [(YYYY-MM, value)]; the first month the line reaches `threshold`."""
    if len(history) < 2:
        return {"months_used": len(history), "slope_per_month": None, "crossing_month": None,
                "note": "needs at least two complete months of data"}
    x = np.array([month_index(m) for m, _ in history], dtype=np.float64)
    y = np.array([v for _, v in history], dtype=np.float64)
    b, a = np.polyfit(x, y, 1)
    last = history[-1][0]
    out = {"months_used": len(history), "slope_per_month": float(b), "intercept_at_last": float(a + b * x[-1]),
           "crossing_month": None}
    if y[-1] > threshold:
        out["note"] = f"already above the threshold in {last}"
        out["crossing_month"] = last
        return out
    if b <= 0:
        out["note"] = "flat or falling trend: no crossing forecast"
        return out
    k = math.ceil((threshold - a) / b - x[-1])
    if k > horizon_months:
        out["note"] = f"trend crosses more than {horizon_months} months after {last}"
        return out
    out["crossing_month"] = month_add(last, max(k, 1))
    out["note"] = f"linear trend reaches the threshold in {out['crossing_month']}"
    return out


def trend_line(history: list[tuple[str, float]], forecast: dict, months_ahead: int) -> list[tuple[str, float]]:
    """Points of the fitted line from the last month `months_ahead` months on (for the chart)."""
    if forecast.get("slope_per_month") is None:
        return []
    last = history[-1][0]
    base, b = forecast["intercept_at_last"], forecast["slope_per_month"]
    return [(month_add(last, k), base + b * k) for k in range(months_ahead + 1)]
