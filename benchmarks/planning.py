"""Snakemake's planning time (``snakemake -n``): all tables at once, repeated, and every table alone.

    python -m benchmarks.planning                 # all_tables x 7, then each table once
    python -m benchmarks.planning --repeats 3 --no-each

Run from anywhere; it plans the repository's own workflow. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Timed:
    target: str
    seconds: list[float] = field(default_factory=list)
    jobs: int | None = None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def dry_run(target: str, timeout: float = 300) -> tuple[float, int | None, str | None]:
    """Wall seconds, planned job count and the last error line of one ``snakemake --profile slurm -n TARGET``."""
    t0 = time.perf_counter()
    # Through the cluster profile (one GPU a job): on a machine without CUDA the default profile
    # refuses the fp16 rows at planning, as it should, so only this plans every table.
    out = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", target], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    text = out.stdout + out.stderr
    match = re.search(r"^total\s+(\d+)\s*$", text, re.MULTILINE)
    jobs = int(match.group(1)) if match else (0 if "Nothing to be done" in text else None)
    error = None if out.returncode == 0 else (text.strip().splitlines() or ["(no output)"])[-1]
    return seconds, jobs, error


def measure(target: str, repeats: int, timeout: float = 300) -> Timed:
    t = Timed(target)
    for _ in range(repeats):
        seconds, t.jobs, t.error = dry_run(target, timeout)
        t.seconds.append(seconds)
        if t.error:
            break
    return t


def table_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "config" / "tables").glob("*.yaml"))


def render(all_tables: Timed, each: list[Timed]) -> str:
    s = all_tables.seconds
    out = ["| Command | Runs | Wall s (median) | min–max | Jobs planned |", "|---|---:|---:|---|---:|",
           f"| `snakemake --profile slurm -n all_tables` | {len(s)} | {all_tables.median:.2f} | {min(s):.2f}–{max(s):.2f} | "
           f"{all_tables.jobs if all_tables.jobs is not None else '?'} |"]
    if each:
        times = [t.seconds[0] for t in each]
        slowest = max(each, key=lambda t: t.seconds[0])
        out.append(f"| `snakemake -n results/tables/<table>.md`, each of {len(each)} tables once | {len(each)} | "
                   f"{statistics.median(times):.2f} | {min(times):.2f}–{max(times):.2f} "
                   f"(slowest: {slowest.target}) | {sum(t.jobs or 0 for t in each)} in all |")
    errors = [t for t in [all_tables, *each] if t.error]
    out += [f"\n`{t.target}` failed: {t.error}" for t in errors]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="dry runs of all_tables (median reported)")
    parser.add_argument("--no-each", action="store_true", help="skip the dry run of every table alone")
    args = parser.parse_args(argv)
    all_tables = measure("all_tables", max(args.repeats, 1))
    each = [] if args.no_each else [measure(f"results/tables/{name}.md", 1) for name in table_names()]
    print(render(all_tables, each))
    return 1 if all_tables.error or any(t.error for t in each) else 0


if __name__ == "__main__":
    sys.exit(main())
