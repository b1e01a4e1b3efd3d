"""Where every seed of a table stands: ``imgclf status config/tables/<table>.yaml``.

One line per seed: done (its test error), running (SLURM job id, epoch k/N), queued (job id),
failed (the job's one-line cause), stopped (a checkpoint and no job: the next run resumes it) or
missing. The scheduler is asked once, for every recorded job of the table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imgclf.launch import jobs


@dataclass
class SeedStatus:
    row: str
    seed: int
    run_dir: Path
    status: str  # done | running | queued | failed | stopped | missing
    detail: str = ""


def _epochs_done(run_dir: Path) -> int:
    """Trained epochs: the log's rows after its header, less train.val_first's epoch-0 row."""
    try:
        rows = (run_dir / "train_log.csv").read_text().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for row in rows if not row.startswith("0,"))


def table_status(spec_path: str | Path, runs_dir: str | Path = "results/runs",
                 recipes_dir: str | Path = "config/recipes") -> list[SeedStatus]:
    from imgclf.tables import spec

    table = spec.load(spec_path, recipes_dir)
    seeds = [(r, s, Path(runs_dir) / r.run_id / f"seed{s}") for r in table.rows if r.run_id for s in r.seeds]
    records = {d: jobs.read_record(d) or {} for _, _, d in seeds}
    ids = sorted({r["job_id"] for r in records.values() if r.get("launcher") == "slurm" and r.get("job_id")})
    states = jobs.slurm_states(ids, fresh=True) if ids else {}
    out = []
    for row, seed, run_dir in seeds:
        record = records[run_dir]
        epochs = row.config.scheduler.epochs if row.config is not None else "?"
        state = states.get(record.get("job_id", ""), "")
        if (run_dir / "eval.json").is_file():
            score = json.loads((run_dir / "eval.json").read_text())
            detail = "diverged" if score.get("diverged") else f"test error {score['test_error']:.2f}%"
            out.append(SeedStatus(row.id, seed, run_dir, "done", detail))
        elif state in jobs.ACTIVE and state not in ("", "UNKNOWN"):
            job = f"SLURM job {record['job_id']}"
            if state == "PENDING":
                out.append(SeedStatus(row.id, seed, run_dir, "queued", job))
            else:
                out.append(SeedStatus(row.id, seed, run_dir, "running",
                                      f"{job}, epoch {_epochs_done(run_dir)}/{epochs}"))
        elif record.get("failure"):
            out.append(SeedStatus(row.id, seed, run_dir, "failed", record["failure"]["message"]))
        elif (run_dir / "checkpoint.pt").is_file() or (run_dir / "result.json").is_file():
            out.append(SeedStatus(row.id, seed, run_dir, "stopped",
                                  f"epoch {_epochs_done(run_dir)}/{epochs}; the next run resumes it"))
        else:
            out.append(SeedStatus(row.id, seed, run_dir, "missing"))
    return out


def render(statuses: list[SeedStatus]) -> str:
    from tabulate import tabulate

    rows = [(s.row, s.seed, s.status, s.detail) for s in statuses]
    counts = {}
    for s in statuses:
        counts[s.status] = counts.get(s.status, 0) + 1
    order = ("done", "running", "queued", "failed", "stopped", "missing")
    summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    return tabulate(rows, headers=("row", "seed", "status", "detail"), tablefmt="plain") + \
        f"\n{len(statuses)} seeds: {summary}"
