"""Aggregation over seeds and rendering of a results table (Markdown + CSV).

Our numbers (median over seeds, min–max, n) stand beside the reference README's and the
paper's; the reported values are only printed, never used in a computation.
"""
from __future__ import annotations

import html
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf import records as run_records
from imgclf.utils import atomic_write_text

from .spec import Row, Table

DASH = "—"


def run_files(table: Table, runs_dir: str | Path = "results/runs") -> list[Path]:
    """Every eval.json the table needs (the workflow's aggregate inputs)."""
    return [Path(runs_dir) / row.run_id / f"seed{s}" / "eval.json"
            for row in table.rows if row.run_id for s in row.seeds]


def _valid_error(error: Any) -> bool:
    """A test error in percent: a number in [0, 100] (NaN: a diverged seed)."""
    if isinstance(error, bool) or not isinstance(error, (int, float)):
        return False
    return math.isnan(error) or 0.0 <= error <= 100.0


def _read_seed(run_dir: Path, expect_hash: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """A seed's eval.json, checked against its result.json for this row's config, or (None, why):
    a corrupt record (garbage, NaN, a missing key, an impossible test error, another config's
    result) counts as not there: the seed is trained again, never shown."""
    try:
        data = run_records.read_seed(run_dir, expect_hash)
    except (run_records.RecordError, OSError) as e:
        return None, str(e)
    if data is None and (run_dir / "diverged.json").is_file():
        data = {"diverged": True, "test_error": float("nan")}
    return data, None


def row_hash(row: Row) -> str | None:
    """The config hash a row's records must carry: the last part of its run id."""
    return row.run_id.rsplit("-", 1)[-1] if row.run_id else None


def aggregate(table: Table, runs_dir: str | Path = "results/runs", partial: bool = False) -> pd.DataFrame:
    """One record per row: our statistics over the finished seeds plus the reported values. A
    corrupt record is said on one line (stderr) and its seed counted as not done."""
    runs_dir = Path(runs_dir)
    records, missing, corrupt = [], [], []
    for row in table.rows:
        seeds = []
        if row.run_id:
            for s in row.seeds:
                data, why = _read_seed(runs_dir / row.run_id / f"seed{s}", row_hash(row))
                if data is None:
                    missing.append(runs_dir / row.run_id / f"seed{s}" / "eval.json")
                    corrupt += [why] if why else []
                else:
                    seeds.append(data)
        records.append(_record(row, seeds))
    if missing and not partial:
        raise FileNotFoundError(f"{len(missing)} seed(s) of table '{table.name}' have not finished (or hold "
                                f"an unreadable or impossible result, or another config's), e.g. "
                                f"{corrupt[0] if corrupt else missing[0]}; run the workflow, or pass --partial")
    for why in corrupt:
        print(f"imgclf: {why}; the seed counts as not done", file=sys.stderr)
    # object columns keep each value as the spec wrote it (no 128 -> 128.0 for a column with gaps)
    return pd.DataFrame(records, dtype=object)


def _record(row: Row, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [s for s in seeds if not s.get("diverged") and _valid_error(s.get("test_error"))
                and not math.isnan(s["test_error"])]
    errors = [float(s["test_error"]) for s in finished]
    times = [float(s["train_seconds"]) for s in finished if s.get("train_seconds") is not None]
    rep = row.reported
    rec: dict[str, Any] = {
        "id": row.id, "label": row.label, "run_id": row.run_id or "", "trained": row.train,
        "epochs": row.config.scheduler.epochs if row.config else None,
        "n_seeds": len(row.seeds) if row.train else 0, "n_done": len(finished),
        "n_diverged": sum(1 for s in seeds if s.get("diverged")),
        "test_error_median": statistics.median(errors) if errors else None,
        "test_error_min": min(errors) if errors else None,
        "test_error_max": max(errors) if errors else None,
        "test_error_mean": statistics.fmean(errors) if errors else None,
        "test_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
        "train_seconds_median": statistics.median(times) if times else None,
        "gpu": ", ".join(sorted({str(s.get("gpu")) for s in finished if s.get("gpu")})),
        "reported_result": rep.get("result"), "reported_result_text": rep.get("result_text"),
        "reported_paper": rep.get("paper"), "reported_epochs": rep.get("epochs"),
        "reported_time": rep.get("time"), "reported_hardware": rep.get("hardware"),
    }
    for col, value in row.cells.items():
        rec[f"cell:{col}"] = value
    return rec


def format_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s" if m < 10 else f"{m}m"
    return f"{s}s"


def _number(x: Any) -> float | None:
    """A reported value as a number when it is one (6.47, "6.47"), else None ("N/A", "6.4*")."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return None if math.isnan(x) else float(x)
    try:
        value = float(str(x))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _num(x: Any) -> str:
    """Two decimals for a number; any other reported value verbatim (it is only printed)."""
    value = _number(x)
    if value is not None:
        return f"{value:.2f}"
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)


def _ours(r: dict[str, Any]) -> str:
    if not r["trained"]:
        return DASH
    if r["n_done"] == 0 and r["n_diverged"]:
        return f"diverged ({r['n_diverged']}/{r['n_seeds']})"
    if r["n_done"] < r["n_seeds"]:
        head = _num(r["test_error_median"]) + " " if r["n_done"] else DASH + " "
        note = f"({r['n_done']}/{r['n_seeds']} done" + (f", {r['n_diverged']} diverged" if r["n_diverged"] else "")
        return head + note + ")"
    return _num(r["test_error_median"])


def _reference(r: dict[str, Any]) -> str:
    text = _num(r["reported_result"])
    if r.get("reported_result_text"):
        text = f"{text} ({r['reported_result_text']})" if text else str(r["reported_result_text"])
    return text


def _present(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with every missing value as None (pandas' NaN/NA/StringDtype gaps included)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _text(value: Any) -> str:
    return str(value) if _present(value) else ""


def display_frame(table: Table, frame: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: one row per spec row, every cell a string (Markdown and HTML share it)."""
    n = max(table.seeds and len(table.seeds), 1)
    rows = []
    for r in frame_records(frame):
        ours_done = bool(r["trained"]) and r["n_done"] > 0
        delta = ""
        reported = _number(r["reported_result"])
        if ours_done and reported is not None and _present(r["test_error_median"]):
            delta = f"{float(r['test_error_median']) - reported:+.2f}"
        ref_time = _text(r["reported_time"])
        if ref_time and _present(r.get("reported_hardware")):
            ref_time += f" ({r['reported_hardware']})"
        line = {"Model": r["label"]}
        for col in table.columns:
            line[col] = _text(r.get(f"cell:{col}"))
        line.update({
            "Epochs": _text(r["epochs"] if r["trained"] else r["reported_epochs"]),
            "Test Error (1 run)" if n == 1 else f"Test Error (median of {n} runs)": _ours(r),
            "min–max": (f"{r['test_error_min']:.2f}–{r['test_error_max']:.2f}"
                        if ours_done and r["n_done"] > 1 else ""),
            "Reference README": _reference(r),
            "Paper": _text(r["reported_paper"]),
            "Δ vs reference": delta,
            "Training Time": format_seconds(r["train_seconds_median"]) if ours_done else "",
            "GPU": _text(r["gpu"]) if ours_done else "",
            "Reference time": ref_time,
        })
        rows.append(line)
    return pd.DataFrame(rows, dtype=object)


def _markdown_cell(text: Any) -> str:
    """A cell of a Markdown table: '|' escaped and line breaks flattened, or the row breaks apart."""
    return " ".join(str(text).split("\n")).replace("\r", " ").replace("|", "\\|")


def render_markdown(table: Table, frame: pd.DataFrame) -> str:
    shown = display_frame(table, frame)
    shown = shown.map(_markdown_cell) if len(shown) else shown
    shown.columns = [_markdown_cell(c) for c in shown.columns]
    body = shown.to_markdown(index=False, tablefmt="github", disable_numparse=True)
    out = f"## {table.title}\n\n{body}\n"
    if table.notes:
        out += "\n" + table.notes.strip() + "\n"
    return out


_HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfbfc; }
p.notes { white-space: pre-wrap; color: #57606a; }
"""


def render_html(table: Table, frame: pd.DataFrame) -> str:
    """The Markdown table's content as one self-contained HTML page (what ``snakemake --report`` shows)."""
    body = display_frame(table, frame).to_html(index=False, escape=True, border=0, na_rep="")
    notes = f'<p class="notes">{html.escape(table.notes.strip())}</p>\n' if table.notes else ""
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(table.title)}</title>'
            f"<style>{_HTML_STYLE}</style></head>\n<body>\n<h2>{html.escape(table.title)}</h2>\n"
            f"{body}\n{notes}</body></html>\n")


def to_csv(frame: pd.DataFrame) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()


# Columns holding text as written in the spec (and cells): read back verbatim, so "N/A" stays
# "N/A" (not NaN) and "5e-4" stays "5e-4" (not 0.0005).
_TEXT_COLUMNS = ("id", "label", "run_id", "gpu", "reported_result_text", "reported_paper", "reported_epochs",
                 "reported_time", "reported_hardware")


def read_csv(path: str | Path) -> pd.DataFrame:
    """A frame written by :func:`to_csv`, with empty cells back to None and text columns verbatim."""
    header = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    text = {c: str for c in header if c in _TEXT_COLUMNS or c.startswith("cell:")}
    frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""], encoding="utf-8")
    return frame.astype(object).where(frame.notna(), None)


def write(table: Table, frame: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    md, csv = out_dir / f"{table.name}.md", out_dir / f"{table.name}.csv"
    atomic_write_text(csv, to_csv(frame))
    atomic_write_text(md, render_markdown(table, frame))
    return md, csv
