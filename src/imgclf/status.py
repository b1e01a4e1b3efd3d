"""Where every seed of a table stands: ``imgclf status config/tables/<table>.yaml``.

One line per seed: done (its test error), running (SLURM job id, or the process holding the run
directory's lock; epoch k/N), queued (job id), failed (the job's one-line cause), corrupt (a
result.json or eval.json that is not a run record: the workflow sets it aside and trains the seed
again), stopped (a checkpoint and no job: the next run resumes it) or missing. The scheduler is
asked once, for every recorded job of the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgclf import launch
from imgclf import records as run_records
from imgclf.launch import jobs


@dataclass
class SeedStatus:
    row: str
    seed: int
    run_dir: Path
    status: str  # done | running | queued | failed | corrupt | stopped | missing
    detail: str = ""


def _epochs_done(run_dir: Path) -> int:
    """Trained epochs: the log's rows after its header, less train.val_first's epoch-0 row."""
    try:
        rows = (run_dir / "train_log.csv").read_text(encoding="utf-8").splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for row in rows if not row.startswith("0,"))


def table_status(spec_path: str | Path, runs_dir: str | Path = "results/runs",
                 recipes_dir: str | Path = "config/recipes") -> list[SeedStatus]:
    from imgclf.tables import spec

    table = spec.load(spec_path, recipes_dir)
    seeds = [(r, s, Path(runs_dir) / r.run_id / f"seed{s}") for r in table.rows if r.run_id for s in r.seeds]
    records = {d: jobs.read_record(d) or {} for _, _, d in seeds}
    states = jobs.job_states(records.values())  # each launcher asked once, for all of its jobs
    out = []
    for row, seed, run_dir in seeds:
        record = records[run_dir]
        epochs = row.config.scheduler.epochs if row.config is not None else "?"
        state = states.get(record.get("job_id", ""), "")
        launcher = launch.get(record["launcher"]) if record.get("launcher") in launch.names() else None
        where = launcher.status(state) if launcher is not None and state else None
        run_hash = row.run_id.rsplit("-", 1)[-1]
        score, corrupt = None, ""
        try:
            score = run_records.read_seed(run_dir, run_hash) if (run_dir / run_records.EVAL).is_file() else None
            if score is None and (run_dir / run_records.RESULT).is_file():
                run_records.read(run_dir / run_records.RESULT, run_hash)
        except run_records.ForeignRecord as e:
            corrupt = f"{e}; move the seed folder away to train it again"
        except (run_records.RecordError, OSError) as e:
            corrupt = f"{e}; the workflow trains it again"
        holder = None if score is not None else jobs.lock_holder(run_dir)
        if score is not None:
            detail = "diverged" if score.get("diverged") else f"test error {score['test_error']:.2f}%"
            out.append(SeedStatus(row.id, seed, run_dir, "done", detail))
        elif where is not None:
            job = f"{launcher.job_kind} {record['job_id']}"
            if where == "queued":
                out.append(SeedStatus(row.id, seed, run_dir, "queued", job))
            else:
                out.append(SeedStatus(row.id, seed, run_dir, "running",
                                      f"{job}, epoch {_epochs_done(run_dir)}/{epochs}"))
        elif holder is not None:
            out.append(SeedStatus(row.id, seed, run_dir, "running",
                                  f"{holder}, epoch {_epochs_done(run_dir)}/{epochs}"))
        elif record.get("failure"):
            out.append(SeedStatus(row.id, seed, run_dir, "failed", record["failure"]["message"]))
        elif corrupt:
            out.append(SeedStatus(row.id, seed, run_dir, "corrupt", corrupt))
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
    order = ("done", "running", "queued", "failed", "corrupt", "stopped", "missing")
    summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
    return tabulate(rows, headers=("row", "seed", "status", "detail"), tablefmt="plain") + \
        f"\n{len(statuses)} seeds: {summary}"
