"""`herd license report`: the release-date question (below / above / cannot tell), JSON, chart, alerts, forecast."""
from __future__ import annotations

import json
from datetime import date

import pytest

from herd.cli import main as herd
from licensing.forecast import linear_forecast
from licensing.ledger import load_sketches
from licensing.report import THRESHOLD, build_report
from licensing.store import LocalStore


def _report(store_dir, *extra):
    return herd(["license", "report", "--store", str(store_dir), *extra])


@pytest.mark.parametrize(
    ("users_in_march", "code", "verdict"),
    [(600e6, 0, "below 700M"), (800e6, 1, "above 700M"), (700e6, 3, "cannot tell")],
)
def test_release_date_question_exit_codes(tmp_path, capsys, month_sketches, users_in_march, code, verdict):
    # Only March counts for a 5 April release: February and April are far off on the other side.
    other = 100e6 if users_in_march > THRESHOLD else 900e6
    month_sketches(LocalStore(str(tmp_path)), {"2025-02": other, "2025-03": users_in_march, "2025-04": other})
    assert _report(tmp_path, "--release-date", "2025-04-05", "--as-of", "2025-04-20", "--json") == code
    rep = json.loads(capsys.readouterr().out)
    q = rep["question"]
    assert q["month"] == "2025-03" and q["verdict"].startswith(verdict) and q["exit_code"] == code
    c = q["company"]
    assert c["low_95"] < users_in_march < c["high_95"]
    if code == 3:
        assert c["low_95"] <= THRESHOLD <= c["high_95"]


def test_release_on_the_first_of_a_month_asks_about_the_previous_month(tmp_path, capsys, month_sketches):
    month_sketches(LocalStore(str(tmp_path)), {"2024-12": 900e6, "2025-01": 100e6})
    assert _report(tmp_path, "--release-date", "2025-01-01", "--as-of", "2025-01-31") == 1
    assert "2024-12" in capsys.readouterr().out


def test_no_data_for_the_month_is_cannot_tell_and_bad_dates_are_invalid(tmp_path, capsys):
    assert _report(tmp_path, "--release-date", "2025-04-05", "--as-of", "2025-04-05") == 3
    assert "no events recorded" in capsys.readouterr().out
    assert _report(tmp_path, "--release-date", "5 April 2025") == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_table_alerts_forecast_and_png(tmp_path, capsys, month_sketches):
    # Growth of 100M a month from 300M: 80% of 700M (560M) reached in June, 700M forecast for August.
    month_sketches(LocalStore(str(tmp_path / "s")),
                   {"2025-03": 300e6, "2025-04": 400e6, "2025-05": 500e6, "2025-06": 600e6})
    png = tmp_path / "trend.png"
    code = _report(tmp_path / "s", "--release-date", "2025-04-05", "--as-of", "2025-06-30", "--plot", str(png))
    out = capsys.readouterr().out
    assert code == 0
    assert "company total" in out and "product chat" in out and "affiliate (licensee)" in out
    assert "alert: 80% of 700M reached" in out
    assert "forecast: linear trend reaches the threshold in 2025-08" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_running_view_figures_and_configured_alert_levels(tmp_path, month_sketches):
    store = LocalStore(str(tmp_path))
    month_sketches(store, {"2025-05": 200e6, "2025-06": 380e6})
    rep = build_report(load_sketches(store), date(2025, 6, 1), date(2025, 6, 30), [10.0, 25.0, 50.0])
    run = rep["running"]
    assert run["current_month"]["month"] == "2025-06"
    assert abs(run["current_month"]["company"]["estimate"] / 380e6 - 1) < 0.03
    # The trailing 30 days (1-30 June) hold only the June sketch (dated the 10th).
    assert run["trailing_30_days"]["company"] == run["current_month"]["company"]
    assert run["alert"] == 50.0
    assert [h["month"] for h in rep["history"]] == ["2025-05", "2025-06"]


def test_linear_forecast():
    f = linear_forecast([("2025-01", 100.0), ("2025-02", 200.0), ("2025-03", 300.0)], 700.0)
    assert f["crossing_month"] == "2025-07" and abs(f["slope_per_month"] - 100) < 1e-9
    assert linear_forecast([("2025-01", 300.0), ("2025-02", 200.0)], 700.0)["crossing_month"] is None
    assert linear_forecast([("2025-01", 800.0), ("2025-02", 900.0)], 700.0)["crossing_month"] == "2025-02"
    assert linear_forecast([("2025-01", 800.0)], 700.0)["note"].startswith("needs at least two")
