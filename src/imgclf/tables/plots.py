"""The report's figures for one results table: learning curves per row, ours vs the reference README.

Each function draws one PNG (matplotlib's Agg backend, written atomically) and returns the data
it plotted, so what a figure shows can be checked without looking at pixels.
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display (cluster nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

from imgclf.utils import atomic_write_bytes  # noqa: E402

from . import report  # noqa: E402
from .spec import Table, load  # noqa: E402

DPI = 110


@dataclass
class Curve:
    """One seed's test error per evaluated epoch (epochs without an evaluation are left out)."""
    seed: int
    epochs: list[int]
    test_error: list[float]
    diverged: bool = False


@dataclass
class RowCurves:
    row_id: str
    label: str
    reference: float | None  # the reference README's final test error, drawn as a dashed line
    curves: list[Curve] = field(default_factory=list)
    missing_seeds: list[int] = field(default_factory=list)


@dataclass
class Point:
    row_id: str
    label: str
    reference: float  # x: the reference README's test error
    ours: float  # y: our median over the finished seeds
    low: float  # our min ... max over seeds (the error bar)
    high: float
    n_done: int
    n_seeds: int


def read_train_log(path: str | Path) -> tuple[list[int], list[float]]:
    """(epochs, test errors) from a run's train_log.csv; NaN/inf rows (no evaluation, divergence) dropped."""
    epochs, errors = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            try:
                epoch, error = int(float(rec["epoch"])), float(rec["test_error"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(error):
                epochs.append(epoch)
                errors.append(error)
    return epochs, errors


def collect_curves(table: Table, runs_dir: str | Path = "results/runs") -> list[RowCurves]:
    """Every trained row's seeds that have a train_log.csv; the others are listed as missing."""
    runs_dir = Path(runs_dir)
    out = []
    for row in table.rows:
        if not row.run_id:
            continue
        rc = RowCurves(row.id, row.label, _float(row.reported.get("result")))
        for s in row.seeds:
            seed_dir = runs_dir / row.run_id / f"seed{s}"
            log = seed_dir / "train_log.csv"
            if not log.is_file():
                rc.missing_seeds.append(s)
                continue
            epochs, errors = read_train_log(log)
            rc.curves.append(Curve(s, epochs, errors, diverged=(seed_dir / "diverged.json").is_file()))
        out.append(rc)
    return out


def plot_learning_curves(table: Table, runs_dir: str | Path, out: str | Path) -> list[RowCurves]:
    """One subplot per trained row: test error vs epoch, one line per seed, the reference as a dashed line."""
    rows = collect_curves(table, runs_dir)
    n = max(len(rows), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, rc in zip(axes.flat, rows):
        for c in rc.curves:
            name = f"seed {c.seed}" + (" (diverged)" if c.diverged else "")
            ax.plot(c.epochs, c.test_error, marker="." if len(c.epochs) < 30 else None, lw=1.2, label=name)
        if rc.reference is not None:
            ax.axhline(rc.reference, color="0.3", ls="--", lw=1, label=f"reference {rc.reference:.2f}")
        done = f"{len(rc.curves)}/{len(rc.curves) + len(rc.missing_seeds)} seeds"
        ax.set_title(textwrap.fill(f"{rc.label} ({done})", 48), fontsize=9)
        ax.set_xlabel("epoch")
        last = max((e for c in rc.curves for e in c.epochs), default=0)
        if last:
            ax.set_xlim(0, last * 1.03 + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        errors = [e for c in rc.curves for e in c.test_error if e > 0]
        if errors and max(errors) > 5 * min(errors):
            # from ~90% at epoch 1 to a few %: a log axis keeps the final epochs (what the table
            # reports) readable
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
        if rc.curves or rc.reference is not None:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished seed", ha="center", va="center", transform=ax.transAxes)
    if not rows:
        axes.flat[0].set_visible(True)
        axes.flat[0].text(0.5, 0.5, "no trained rows", ha="center", va="center")
        axes.flat[0].set_axis_off()
    fig.suptitle(f"{table.title}: learning curves", fontsize=11)
    _save(fig, out)
    return rows


def collect_points(table: Table, frame) -> list[Point]:
    """Rows with both our median and a numeric reference README result (the others are skipped)."""
    points = []
    for r in report.frame_records(frame):
        ours, ref = _float(r.get("test_error_median")), _float(r.get("reported_result"))
        if not r.get("trained") or ours is None or ref is None:
            continue
        low, high = _float(r.get("test_error_min")), _float(r.get("test_error_max"))
        points.append(Point(r["id"], r["label"], ref, ours, low if low is not None else ours,
                            high if high is not None else ours, int(r["n_done"]), int(r["n_seeds"])))
    return points


def plot_paper_vs_ours(table: Table, frame, out: str | Path) -> list[Point]:
    """Our median test error (min–max bars) against the reference README's, with the line y = x."""
    points = collect_points(table, frame)
    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    if points:
        xs = [p.reference for p in points]
        ys = [p.ours for p in points]
        yerr = [[p.ours - p.low for p in points], [p.high - p.ours for p in points]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", ms=5, capsize=3, label="ours: median (min–max over seeds)")
        lo, hi = min(xs + [p.low for p in points]), max(xs + [p.high for p in points])
        pad = max((hi - lo) * 0.08, 0.1)
        lo, hi = max(lo - pad, 0.0), hi + pad
        ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=1, label="y = x (same as the reference)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        for p in points:
            partial = "" if p.n_done == p.n_seeds else f" ({p.n_done}/{p.n_seeds})"
            ax.annotate(textwrap.shorten(p.label, 36) + partial, (p.reference, p.ours), fontsize=6,
                        xytext=(4, 3), textcoords="offset points")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no row has both a finished run and a reference value", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("reference README test error (%)")
    ax.set_ylabel("our test error (%)")
    ax.grid(alpha=0.3)
    ax.set_title(textwrap.fill(f"{table.title}: ours vs the reference README", 60), fontsize=10)
    _save(fig, out)
    return points


def plot_table(spec_path: str | Path, csv_in: str | Path, runs_dir: str | Path, curves_out: str | Path,
               scatter_out: str | Path, recipes_dir: str | Path = "config/recipes"
               ) -> tuple[list[RowCurves], list[Point]]:
    """Both figures of one table (the workflow's plots rule)."""
    table = load(spec_path, recipes_dir)
    return (plot_learning_curves(table, runs_dir, curves_out),
            plot_paper_vs_ours(table, report.read_csv(csv_in), scatter_out))


def _float(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _save(fig, out: str | Path) -> None:
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
