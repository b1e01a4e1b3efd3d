"""What a results table shows: its Markdown/HTML rendering and figures on hand-written runs, and
`snakemake --report` assembling tables and figures for a tiny table trained end to end."""
from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import RECIPES, REPO, TINY
from imgclf import cli, data
from imgclf.engine.trainer import LOG_FIELDS
from imgclf.tables import plots, report, spec

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]
NAN = float("nan")

# Each row: its spec, and per seed the test error per epoch (None: the seed has not run;
# "diverged": the seed's loss blew up after one evaluated epoch, so it has a diverged.json).
ROWS = {
    "full": ({"label": "ResNet-preact-8", "cells": {"Weight decay": "5e-4"},
              "reported": {"result": 5.0, "paper": "4.9 (median of 5 runs)", "time": "1h02m",
                           "hardware": "GTX 980"}},
             {0: [50.0, 20.0, 5.5], 1: [60.0, NAN, 5.3]}),
    "partial": ({"label": "ResNet-preact-8, lr 0.05", "overrides": {"train.base_lr": 0.05},
                 "cells": {"Weight decay": 0.0001}, "reported": {"result": 6.0, "paper": "N/A"}},
                {0: [40.0, 10.0, 4.75], 1: None}),
    "unstable": ({"label": "Unstable, lr 1.0", "overrides": {"train.base_lr": 1.0},
                  "reported": {"result": 7.0}},
                 {0: "diverged", 1: [30.0, 12.0, 7.25]}),
    "exploded": ({"label": "Exploded, lr 9.0", "overrides": {"train.base_lr": 9.0}, "reported": {"result": 8.0}},
                 {0: "diverged", 1: "diverged"}),
    "paper_only": ({"label": "A paper-only row", "train": False, "reported": {"result": 2.0, "paper": "1.23"}},
                   {}),
}


def write_synthetic(root: Path, row_ids: list[str]) -> tuple[Path, Path, spec.Table]:
    """A table spec with ``row_ids`` (2 seeds each) and its run folders written by hand, as the
    trainer and evaluator leave them."""
    rows = []
    for rid in row_ids:
        row, _ = ROWS[rid]
        rows.append({"id": rid, "recipe": "digits/resnet_preact.yaml",
                     **row, "overrides": {**TINY, **row.get("overrides", {})}})
    path = root / "synth.yaml"
    path.write_text(yaml.safe_dump({"title": "Synthetic", "seeds": [0, 1], "columns": ["Weight decay"],
                                    "rows": rows}, sort_keys=False))
    table = spec.load(path, RECIPES)
    runs = root / "runs"
    for row in table.rows:
        for seed, errors in ROWS[row.id][1].items():
            if errors is None:
                continue
            seed_dir = runs / row.run_id / f"seed{seed}"
            seed_dir.mkdir(parents=True)
            diverged = errors == "diverged"
            if diverged:
                errors = [70.0 + seed, NAN, NAN]  # a loss that became non-finite after epoch 1
            with open(seed_dir / "train_log.csv", "w", newline="") as f:
                w = csv.DictWriter(f, LOG_FIELDS)
                w.writeheader()
                for epoch, error in enumerate(errors, 1):
                    w.writerow({"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_error": error,
                                "test_loss": 1.0, "test_error": error, "epoch_seconds": 20.0,
                                "images_per_second": 100.0})
            if diverged:
                note = {"diverged": True, "test_error": None, "message": "non-finite loss in epoch 2"}
                (seed_dir / "diverged.json").write_text(json.dumps(note))
                if row.id == "exploded":  # as the engine leaves it; "unstable" has only diverged.json
                    (seed_dir / "result.json").write_text(json.dumps(note))
                    (seed_dir / "eval.json").write_text(json.dumps(note))
                continue
            result = {"test_error": errors[-1], "train_seconds": 60.0, "wall_seconds": 61.0, "gpu": "H200",
                      "epochs": 3, "seed": seed}
            (seed_dir / "result.json").write_text(json.dumps(result))
            (seed_dir / "eval.json").write_text(json.dumps({**result, "test_loss": 0.2, "n_test": 450}))
    return path, runs, table


def markdown_rows(md: str) -> dict[str, dict[str, str]]:
    """{Model: {column: cell}} from a rendered GitHub Markdown table."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header = split[0]
    return {cells[0]: dict(zip(header, cells)) for cells in split[2:]}


def test_figures_plot_each_seed_and_each_reference(tmp_path):
    _, runs, table = write_synthetic(tmp_path, ["full", "partial", "paper_only"])
    frame = report.aggregate(table, runs, partial=True)

    curves = plots.plot_learning_curves(table, runs, tmp_path / "fig" / "learning_curves.png")
    assert [c.row_id for c in curves] == ["full", "partial"]  # paper-only rows have no curves
    full, partial = curves
    assert [c.seed for c in full.curves] == [0, 1] and full.missing_seeds == []
    assert full.curves[1].epochs == [1, 3] and full.curves[1].test_error == [60.0, 5.3]  # unevaluated epoch 2
    assert [c.seed for c in partial.curves] == [0] and partial.missing_seeds == [1]
    assert (full.reference, partial.reference) == (5.0, 6.0)

    points = plots.plot_paper_vs_ours(table, frame, tmp_path / "fig" / "paper_vs_ours.png")
    assert [(p.row_id, p.reference, p.ours) for p in points] == [("full", 5.0, 5.4), ("partial", 6.0, 4.75)]
    assert (points[0].low, points[0].high) == (5.3, 5.5) and (points[1].n_done, points[1].n_seeds) == (1, 2)

    for name in ("learning_curves.png", "paper_vs_ours.png"):
        data = (tmp_path / "fig" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert not list((tmp_path / "fig").glob(".*.tmp"))  # written atomically


def test_figures_with_nothing_to_compare_still_render(tmp_path):
    """No reference values and no finished seed (a fresh quickstart): figures say so, nothing fails."""
    _, runs, table = write_synthetic(tmp_path, ["partial"])
    shutil.rmtree(runs)
    frame = report.aggregate(table, runs, partial=True)
    curves = plots.plot_learning_curves(table, runs, tmp_path / "lc.png")
    assert curves[0].curves == [] and curves[0].missing_seeds == [0, 1]
    assert plots.plot_paper_vs_ours(table, frame, tmp_path / "pvo.png") == []
    assert (tmp_path / "lc.png").stat().st_size > 0 and (tmp_path / "pvo.png").stat().st_size > 0


def test_markdown_marks_missing_diverged_and_paper_only_rows(tmp_path):
    path, runs, table = write_synthetic(tmp_path, list(ROWS))
    frame = report.aggregate(table, runs, partial=True)
    csv_path = tmp_path / "synth.csv"
    csv_path.write_text(report.to_csv(frame))
    md = report.render_markdown(table, frame)
    # The workflow renders from the CSV: the round trip changes nothing ("N/A", "5e-4" stay text).
    assert report.render_markdown(table, report.read_csv(csv_path)) == md
    rows = markdown_rows(md)
    ours = "Test Error (median of 2 runs)"
    assert list(rows) == [ROWS[r][0]["label"] for r in ROWS]

    full = rows["ResNet-preact-8"]
    assert (full[ours], full["min–max"], full["Δ vs reference"]) == ("5.40", "5.30–5.50", "+0.40")
    assert (full["Reference README"], full["Paper"], full["Reference time"]) == (
        "5.00", "4.9 (median of 5 runs)", "1h02m (GTX 980)")
    assert (full["Training Time"], full["GPU"], full["Epochs"], full["Weight decay"]) == ("1m00s", "H200", "3", "5e-4")

    partial = rows["ResNet-preact-8, lr 0.05"]
    assert (partial[ours], partial["min–max"], partial["Δ vs reference"]) == ("4.75 (1/2 done)", "", "-1.25")
    assert (partial["Paper"], partial["Weight decay"]) == ("N/A", "0.0001")

    unstable = rows["Unstable, lr 1.0"]
    assert unstable[ours] == "7.25 (1/2 done, 1 diverged)"  # the diverged seed adds no number
    exploded = rows["Exploded, lr 9.0"]
    assert exploded[ours] == "diverged (2/2)"
    assert exploded["min–max"] == exploded["Δ vs reference"] == exploded["Training Time"] == ""
    assert not any(c.isdigit() for c in exploded[ours].replace("(2/2)", ""))

    paper = rows["A paper-only row"]
    assert (paper[ours], paper["Paper"], paper["Reference README"], paper["Δ vs reference"]) == ("—", "1.23",
                                                                                                  "2.00", "")
    html = report.render_html(table, frame)
    assert "<table" in html and "diverged (2/2)" in html and "+0.40" in html and "1h02m (GTX 980)" in html


def test_cli_table_partial_renders_and_strict_names_a_missing_seed(tmp_path, capsys):
    path, runs, table = write_synthetic(tmp_path, ["full", "partial", "paper_only"])
    common = [str(path), "--runs", str(runs), "--out", str(tmp_path / "out"), "--recipes", str(RECIPES)]
    assert cli.main(["table", *common, "--partial"]) == 0
    printed = capsys.readouterr().out
    assert "4.75 (1/2 done)" in printed and "| A paper-only row" in printed
    assert (tmp_path / "out" / "synth.md").read_text().strip() == printed.strip()
    assert (tmp_path / "out" / "synth.csv").is_file()

    (tmp_path / "out" / "synth.md").unlink()
    assert cli.main(["table", *common]) == 2
    err = capsys.readouterr().err.strip()
    missing = runs / table.rows[1].run_id / "seed1" / "eval.json"
    assert len(err.splitlines()) == 1 and err.startswith("imgclf table: error: ")
    assert str(missing) in err and "--partial" in err
    assert not (tmp_path / "out" / "synth.md").exists()


@pytest.fixture(scope="module")
def built_project(tmp_path_factory):
    """A 1-row, 1-seed, 1-epoch table built by `snakemake`, then `snakemake --report`."""
    root = tmp_path_factory.mktemp("report_project")
    shutil.copytree(RECIPES, root / "config" / "recipes")
    (root / "config" / "tables").mkdir()
    table = {"title": "Tiny report", "seeds": [0], "rows": [
        {"id": "depth8", "label": "ResNet-preact-8 tiny", "recipe": "digits/resnet_preact.yaml",
         "overrides": {**TINY, "scheduler.epochs": 1}, "reported": {"result": 50.0, "time": "1m",
                                                                      "hardware": "GTX 980"}}]}
    (root / "config" / "tables" / "tiny.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["tiny"], progress=False)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache")}
    # The data rule's output, prepared in this process (torch is loaded already): the data rule has
    # its own tests (test_workflow.py); here it would only add a job's start-up time.
    saved = os.environ["IMGCLF_CACHE_DIR"]
    os.environ["IMGCLF_CACHE_DIR"] = env["IMGCLF_CACHE_DIR"]
    try:
        data.prepare("digits", root=root / "resources" / "data")
    finally:
        os.environ["IMGCLF_CACHE_DIR"] = saved
    for args in ([], ["--report", "report.html"]):
        out = subprocess.run([*SNAKEMAKE, "--directory", str(root), "--cores", "2", *args], cwd=root, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root


def report_results(html: str) -> dict:
    """The report's embedded ``var results = {path: {name, caption, labels, data_uri, ...}}``."""
    start = html.index("var results = ", html.index('<script id="results">')) + len("var results = ")
    return json.JSONDecoder().raw_decode(html, start)[0]


def decode(entry: dict) -> bytes:
    return base64.b64decode(entry["data_uri"].split(";base64,", 1)[1])


def test_report_embeds_every_table_and_figure(built_project):
    results = report_results((built_project / "report.html").read_text())
    tables = "results/tables/"
    expected = {tables + "tiny.html", tables + "tiny.md", tables + "tiny/learning_curves.png",
                tables + "tiny/paper_vs_ours.png"}
    assert expected <= set(results)
    for path in expected:
        assert results[path]["labels"]["table"] == "tiny"
        assert results[path]["caption"].strip()
    html_table = decode(results[tables + "tiny.html"]).decode()
    assert results[tables + "tiny.html"]["mime_type"] == "text/html"
    assert "ResNet-preact-8 tiny" in html_table and "Tiny report" in html_table and "1m (GTX 980)" in html_table
    assert "Test Error (1 run)" in html_table
    assert "| ResNet-preact-8 tiny" in decode(results[tables + "tiny.md"]).decode()
    for name in ("learning_curves.png", "paper_vs_ours.png"):
        assert decode(results[f"{tables}tiny/{name}"]).startswith(b"\x89PNG")
    assert "learning curves" in results[tables + "tiny/learning_curves.png"]["caption"].lower()


def test_lint_is_clean(built_project):
    out = subprocess.run([*SNAKEMAKE, "--directory", str(built_project), "--lint"], cwd=built_project,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Congratulations" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("errors", [
    [5.0, 5.5, 9.5],  # skewed: median 5.5, mean 6.67
    [4.0, 4.25, 4.5, 4.75, 12.0],  # one seed far off: median 4.5, mean 5.9
    [9.5, 5.0, 5.5, 30.0, 6.0],  # unsorted seed order: median 6.0
])
def test_median_over_three_or_more_skewed_seeds(tmp_path, errors):
    """With 3 and 5 seeds the median differs from the mean, and a middle value is picked from
    the sorted errors, not from the seed order."""
    import statistics

    seeds = list(range(len(errors)))
    row = {"id": "skewed", "label": "Skewed", "recipe": "digits/resnet_preact.yaml", "overrides": TINY,
           "reported": {"result": 5.0}}
    path = tmp_path / "skewed.yaml"
    path.write_text(yaml.safe_dump({"title": "Skewed", "seeds": seeds, "rows": [row]}, sort_keys=False))
    table = spec.load(path, RECIPES)
    runs = tmp_path / "runs"
    for seed, error in zip(seeds, errors):
        seed_dir = runs / table.rows[0].run_id / f"seed{seed}"
        seed_dir.mkdir(parents=True)
        result = {"test_error": error, "train_seconds": 10.0 * (seed + 1), "wall_seconds": 1.0, "epochs": 3,
                  "seed": seed}
        (seed_dir / "eval.json").write_text(json.dumps({**result, "test_loss": 0.2, "n_test": 450}))
    r = report.frame_records(report.aggregate(table, runs))[0]
    median = sorted(errors)[len(errors) // 2]
    assert r["test_error_median"] == median != pytest.approx(statistics.fmean(errors))
    assert r["test_error_mean"] == pytest.approx(statistics.fmean(errors))
    assert (r["test_error_min"], r["test_error_max"], r["n_done"]) == (min(errors), max(errors), len(errors))
    assert r["train_seconds_median"] == 10.0 * (len(errors) // 2 + 1)
    md = markdown_rows(report.render_markdown(table, report.aggregate(table, runs)))
    assert md["Skewed"][f"Test Error (median of {len(errors)} runs)"] == f"{median:.2f}"
