"""The MAU trend chart: monthly company-wide estimates with 95% bars, 700M and alert lines, the linear forecast."""
from __future__ import annotations

from licensing.forecast import month_index, trend_line
from licensing.report import THRESHOLD


def plot_trend(rep: dict, path: str, months_ahead: int = 6) -> str:
    """Write the chart for a report (`build_report`'s dict) as a PNG at `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    hist = rep["history"]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    if hist:
        xs = [month_index(h["month"]) for h in hist]
        ys = [h["estimate"] / 1e6 for h in hist]
        err = [[(h["estimate"] - h["low_95"]) / 1e6 for h in hist], [(h["high_95"] - h["estimate"]) / 1e6
                                                                     for h in hist]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="monthly active users (95% bounds)")
        complete = [(h["month"], h["estimate"]) for h in hist if h["month"] < rep["running"]["current_month"]["month"]]
        line = trend_line(complete, rep["running"]["forecast"], months_ahead) if complete else []
        if line:
            ax.plot([month_index(m) for m, _ in line], [v / 1e6 for _, v in line], "--", color="gray",
                    label="linear trend")
        ticks = sorted(set(xs + [month_index(m) for m, _ in line]))
        ax.set_xticks(ticks, [f"{t // 12}-{t % 12 + 1:02d}" for t in ticks], rotation=45, ha="right")
    ax.axhline(THRESHOLD / 1e6, color="red", label="700M licence threshold")
    for lv in rep["running"]["alert_levels"]:
        if lv < 100:
            ax.axhline(THRESHOLD * lv / 100 / 1e6, color="orange", linestyle=":", linewidth=0.8)
    ax.set_ylabel("million users")
    ax.set_title("Monthly active users, all products and affiliates (Llama 4 licence, section 2)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
