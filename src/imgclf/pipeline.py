"""What the workflow's rules call: one function per rule, plain arguments, no Snakemake.

The workflow expands table specs into runs; these functions do one run-seed (trained, then
scored), one aggregation or one rendering each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf import config as C
from imgclf.launch.base import DEFAULT


def train_seed(run_dir: str | Path, config: dict[str, Any], seed: int, *, launcher: str = DEFAULT,
               resources: dict[str, Any] | None = None, data_root: str = "", progress: bool = True,
               attempt: int = 1) -> dict[str, Any]:
    """Train (or resume) one seed of a run into ``run_dir``, then score its saved final weights in
    the same job: ``result.json`` marks the training complete, ``eval.json`` the seed. The torch
    thread count is the resolved config's (``train.threads``), so the launcher never changes the
    numbers; ``attempt`` > 1 is a Snakemake retry."""
    from imgclf import runs
    from imgclf.launch import Resources, get, jobs, run

    cfg = C.from_dict(config)
    cfg.train.seed = seed
    if data_root:
        cfg.data_root = str(Path(data_root).resolve())
    run_dir = Path(run_dir)
    label = jobs.seed_label(run_dir)
    # Checked before the run directory is written: these values become the job's sbatch script.
    runs.preflight(cfg)  # what would fail the job, refused before it waits in a queue
    res = Resources.from_dict(resources, label)
    runs.prepare(cfg, run_dir, resume=True)  # an interrupted seed resumes from its checkpoint
    if not get(launcher).submits:
        jobs.say(f"{label}: training on this machine (launcher {launcher}, {cfg.train.threads} thread(s))")
    return run(run_dir, launcher=launcher, resources=res, job_name=label, progress=progress, evaluate=True,
               attempt=attempt)


def train_pack(pack_dir: str | Path, seeds: list[tuple[str | Path, dict[str, Any], int]], *,
               launcher: str = DEFAULT, resources: dict[str, Any] | None = None, data_root: str = "",
               attempt: int = 1) -> dict[str, dict[str, Any]]:
    """Train several seeds (``(run_dir, config, seed)`` each) side by side in one job, each its own
    process with its own run directory (see :mod:`imgclf.launch.pack`); then score each. Returns
    {seed label: result}; raises :class:`PackFailed` naming, one line each, the seeds that failed
    (the others' results stand, and a re-run trains only the failed ones)."""
    from imgclf import runs
    from imgclf.launch import Resources, get, jobs

    res = Resources.from_dict(resources, str(pack_dir))
    dirs = []
    for run_dir, config, seed in seeds:
        cfg = C.from_dict(config)
        cfg.train.seed = seed
        if data_root:
            cfg.data_root = str(Path(data_root).resolve())
        runs.preflight(cfg)
        runs.prepare(cfg, run_dir, resume=True)
        dirs.append(Path(run_dir))
    outcomes = jobs.launch_pack(pack_dir, dirs, get(launcher), res, job_name=jobs.seed_label(pack_dir),
                                attempt=attempt)
    failed = [str(o) for o in outcomes.values() if isinstance(o, Exception)]
    if failed:
        raise PackFailed(failed)
    return {jobs.seed_label(d): o for d, o in outcomes.items()}


class PackFailed(RuntimeError):
    """Seeds of a pack failed; ``lines`` holds one line per failed seed."""

    def __init__(self, lines: list[str]):
        super().__init__(f"{len(lines)} packed seed(s) failed: " + " | ".join(lines))
        self.lines = lines


def aggregate_table(spec_path: str | Path, runs_dir: str | Path, csv_out: str | Path,
                    recipes_dir: str | Path = "config/recipes", partial: bool = False) -> None:
    from imgclf.tables import report, spec
    from imgclf.utils import atomic_write_text

    table = spec.load(spec_path, recipes_dir)
    atomic_write_text(csv_out, report.to_csv(report.aggregate(table, runs_dir, partial=partial)))


def render_table(spec_path: str | Path, csv_in: str | Path, md_out: str | Path, html_out: str | Path | None = None,
                 recipes_dir: str | Path = "config/recipes") -> None:
    """The Markdown table (and the same rows as HTML, which ``snakemake --report`` displays)."""
    from imgclf.tables import report, spec
    from imgclf.utils import atomic_write_text

    table = spec.load(spec_path, recipes_dir)
    frame = report.read_csv(csv_in)
    atomic_write_text(md_out, report.render_markdown(table, frame))
    if html_out is not None:
        atomic_write_text(html_out, report.render_html(table, frame))
