"""All table specs expanded into runs once: what the workflow plans from.

Rows of different tables that resolve to the same config share one run (and its seeds).
Resolving ~365 rows takes about half a second, a tenth of a dry run of every table, so the
workflow keeps the expanded plan in a JSON file keyed by the content of every spec, recipe
and imgclf source file: any edit there resolves everything again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import spec as S


@dataclass
class Run:
    run_id: str
    dataset: str
    config: dict[str, Any]
    resources: dict[str, Any]
    seeds: set[int] = field(default_factory=set)
    rows: list[str] = field(default_factory=list)  # "<table>/<row id>"
    reported_hours: float | None = None  # one seed's training time in the reference README


def parse_duration(text: Any) -> float | None:
    """'3h05m', '41m', '24h28m*', '1H26M' -> hours; None when absent or unreadable."""
    if not isinstance(text, str):
        return None
    m = re.fullmatch(r"\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*\**\s*", text.lower())
    if not m or not any(m.groups()):
        return None
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h + mi / 60 + s / 3600


CACHE_FORMAT = 1


class Plan:
    def __init__(self, tables: dict[str, S.Table], defaults: dict[str, Any] | None = None):
        from imgclf.launch.resources import check

        check(dict(defaults or {}), "config", "resources")  # the rows' own are checked by spec.load
        self.tables = tables
        self.runs: dict[str, Run] = {}
        from_rows: dict[str, set[str]] = {}
        for name, table in tables.items():
            for row in table.rows:
                if not row.run_id:
                    continue
                run = self.runs.get(row.run_id)
                if run is None:
                    run = self.runs[row.run_id] = Run(row.run_id, row.config.dataset.name, row.config.to_dict(),
                                                      dict(defaults or {}))
                    from_rows[row.run_id] = set()
                # A row's resources replace the defaults, lower or higher; rows that share a run
                # (the same computation) get the largest of what they ask.
                for key, value in row.resources.items():
                    old = run.resources.get(key)
                    shared = key in from_rows[row.run_id] and isinstance(old, (int, float))
                    run.resources[key] = max(old, value) if shared and isinstance(value, (int, float)) else value
                    from_rows[row.run_id].add(key)
                run.seeds.update(row.seeds)
                run.rows.append(f"{name}/{row.id}")
                hours = parse_duration(row.reported.get("time"))
                if hours is not None:
                    run.reported_hours = max(run.reported_hours or 0.0, hours)
        from imgclf.launch.resources import pack_problem, share_problem

        for run in self.runs.values():
            # A campaign-wide default (--config 'resources={seeds_per_gpu: 4}') packs or shares the
            # runs that can be; a multi-GPU row keeps its GPUs to itself. A row's own ask is checked.
            for key, default, problem in (("seeds_per_gpu", 1, pack_problem), ("gpu_share", "", share_problem)):
                if key not in from_rows[run.run_id] and problem(run.resources):
                    run.resources[key] = default
            said = pack_problem(run.resources) or share_problem(run.resources)
            if said:
                raise S.SpecError(f"{', '.join(run.rows)}: resources: {said}")

    @classmethod
    def from_dir(cls, tables_dir: str | Path = "config/tables", recipes_dir: str | Path = "config/recipes",
                 defaults: dict[str, Any] | None = None, schema: str | Path | None = None) -> "Plan":
        tables = {}
        validator = _validator(schema) if schema else None
        for path in sorted(Path(tables_dir).glob("*.yaml")):
            if validator is not None:
                _check_schema(validator, path)
            tables[path.stem] = S.load(path, recipes_dir)
        return cls(tables, defaults)

    @classmethod
    def cached(cls, cache: str | Path, tables_dir: str | Path = "config/tables",
               recipes_dir: str | Path = "config/recipes", defaults: dict[str, Any] | None = None) -> "Plan":
        """:meth:`from_dir`, kept in the JSON file ``cache`` while no spec, recipe or imgclf source
        file changes. Rows read back from the cache have ``config=None``: the
        resolved configs are in :attr:`runs`. Errors are never cached: a bad spec fails every time."""
        cache = Path(cache)
        key = _cache_key(Path(tables_dir), Path(recipes_dir), defaults)
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data.get("key") == key:
                return cls._from_json(data)
        except Exception:  # noqa: BLE001 - missing, stale or unreadable: resolve again
            pass
        plan = cls.from_dir(tables_dir, recipes_dir, defaults)
        try:
            from imgclf.utils import atomic_write_text

            atomic_write_text(cache, json.dumps({"key": key, **plan._to_json()}))
        except (OSError, TypeError, ValueError):
            pass  # a read-only checkout, or a spec value JSON cannot hold: plan without the cache
        return plan

    def _to_json(self) -> dict[str, Any]:
        tables = {}
        for name, t in self.tables.items():
            rows = [{f.name: getattr(r, f.name) for f in dataclasses.fields(S.Row) if f.name != "config"}
                    for r in t.rows]
            tables[name] = {"path": str(t.path), "title": t.title, "seeds": t.seeds, "columns": t.columns,
                            "notes": t.notes, "rows": rows}
        runs = {rid: {**dataclasses.asdict(r), "seeds": sorted(r.seeds)} for rid, r in self.runs.items()}
        return {"format": CACHE_FORMAT, "tables": tables, "runs": runs}

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> "Plan":
        if data["format"] != CACHE_FORMAT:
            raise ValueError("old cache format")
        plan = cls({})
        for name, t in data["tables"].items():
            rows = [S.Row(**r) for r in t.pop("rows")]
            plan.tables[name] = S.Table(name=name, **{**t, "path": Path(t["path"])}, rows=rows)
        plan.runs = {rid: Run(**{**r, "seeds": set(r["seeds"])}) for rid, r in data["runs"].items()}
        return plan

    def packs(self) -> dict[str, list[tuple[str, int]]]:
        """{pack id: [(run id, seed), ...]}: the run-seeds whose run asks for ``seeds_per_gpu`` k > 1,
        k to a pack. A pack holds seeds of one run, or of runs that train the same model on the same
        data at the same batch size and precision with the same resources, so its members take
        about the same time and memory. Seeds of a run stay together; the ids depend only on the
        members, so a re-plan finds the same packs."""
        groups: dict[str, list[tuple[str, int]]] = {}
        for run in sorted(self.runs.values(), key=lambda r: r.run_id):
            if int(run.resources.get("seeds_per_gpu", 1) or 1) > 1:
                train = run.config["train"]
                key = json.dumps([run.dataset, run.config["model"], train["batch_size"], train["precision"],
                                  run.resources], sort_keys=True, default=str)
                groups.setdefault(key, []).extend((run.run_id, s) for s in sorted(run.seeds))
        packs = {}
        for members in groups.values():
            k = int(self.runs[members[0][0]].resources["seeds_per_gpu"])
            for i in range(0, len(members), k):
                chunk = members[i:i + k]
                digest = hashlib.sha256(json.dumps(chunk).encode()).hexdigest()[:8]
                packs[f"{chunk[0][0].split('-', 1)[0]}-k{len(chunk)}-{digest}"] = chunk
        return packs

    def seed_files(self, table: str, runs_dir: str | Path) -> list[str]:
        """The aggregation's inputs: every seed's result.json and eval.json (both written by its
        training job, both read by the aggregation), and the seed's folder.

        Snakemake re-creates a missing intermediate file only when something downstream must
        run; deleting a file updates its folder's mtime, which makes the aggregation (and so
        exactly that seed's job) run again. So the seed's folder is an input, or when it was
        deleted (``rm -r``), the nearest folder above it that exists: the deletion updated that one."""
        t = self.tables[table]
        out = []
        for r in t.rows:
            if r.run_id:
                for s in r.seeds:
                    seed_dir = Path(runs_dir) / r.run_id / f"seed{s}"
                    out += [str(seed_dir / "result.json"), str(seed_dir / "eval.json")]
                    folder = next((d for d in (seed_dir, seed_dir.parent, Path(runs_dir)) if d.is_dir()), None)
                    if folder is not None and str(folder) not in out:
                        out.append(str(folder))
        return out

    # --- cost: computed from the cached plan and the calibration file, never cached itself ----
    calibration = None  # a cost.Calibration: GPU-hours from measured img/s where it covers a run
    calibration_path = ""  # where the calibration was looked for (said when there is none)
    SUMMARY_TABLES = 5  # the most expensive tables each get a line; the rest one line together

    def use_calibration(self, calibration, path: str | Path = "") -> None:
        self.calibration, self.calibration_path = calibration, str(path)
        self._priorities = None

    def seed_cost(self, run_id: str):
        from imgclf.cost import seed_cost

        run = self.runs[run_id]
        return seed_cost(run.config, run.resources, run.reported_hours, self.calibration)

    def priority(self, run_id: str) -> int:
        """Snakemake's priority of every seed of ``run_id``: the cheapest run (one seed's GPU-hours
        at its seeds_per_gpu) gets the highest, the most expensive 1; runs of no known cost come
        last. Every run has its own value (ties by run id), so the seeds of one run go together
        and a row's median is there as early as the rows before it allow."""
        if getattr(self, "_priorities", None) is None:
            def key(run_id):
                hours = self.seed_cost(run_id).packed
                return (hours is None, hours or 0.0, run_id)

            order = sorted(self.runs, key=key)
            self._priorities = {rid: len(order) - i for i, rid in enumerate(order)}
        return self._priorities[run_id]

    def summary(self, runs_dir: str | Path = "results/runs") -> str:
        """The plan in a few lines: runs and seeds, then the GPU-hours of the seeds still to train,
        for the campaign (every seed once) and for the most expensive tables."""
        runs_dir = Path(runs_dir)
        jobs = [(r.run_id, s) for r in self.runs.values() for s in sorted(r.seeds)]
        todo = {(rid, s) for rid, s in jobs if not (runs_dir / rid / f"seed{s}" / "result.json").is_file()}
        rows = sum(len(t.rows) for t in self.tables.values())
        lines = [f"imgclf plan: {len(self.tables)} tables, {rows} rows -> {len(self.runs)} distinct runs, "
                 f"{len(jobs)} run-seeds ({len(jobs) - len(todo)} done, {len(todo)} to train)"]
        costs = {rid: self.seed_cost(rid) for rid in {rid for rid, _ in todo}}
        if self.calibration is None:
            where = (f"no calibration file {self.calibration_path}" if self.calibration_path
                     else "no calibration file set")
            head = f"at the reference README's reported times ({where}; `imgclf calibrate` measures a GPU)"
        else:
            head = (f"at the runs' seeds_per_gpu / at 1 seed per GPU / at the reference README's times "
                    f"({self.calibration.describe()}; seeds it does not cover count the reference's times)")
        lines.append(f"imgclf GPU-hours to go {head}: {self._hours(sorted(todo), costs)}")
        per_table = []
        for name, t in self.tables.items():
            seeds = sorted({(r.run_id, s) for r in t.rows if r.run_id for s in r.seeds} & todo)
            if seeds:
                total = sum(self._one(costs[rid]) for rid, _ in seeds)
                per_table.append((-total, name, seeds))
        per_table.sort()
        for _, name, seeds in per_table[:self.SUMMARY_TABLES]:
            lines.append(f"  {name}: {self._hours(seeds, costs)}")
        rest = per_table[self.SUMMARY_TABLES:]
        if rest:
            lines.append(f"  {len(rest)} more table(s) with seeds to train: {sum(-t for t, _, _ in rest):,.1f}")
        return "\n".join(lines)

    def _one(self, cost) -> float:
        return (cost.packed if self.calibration is not None else cost.reference) or 0.0

    def _hours(self, seeds, costs) -> str:
        """'<hours> (<n> seeds, ...)' for the (run id, seed) pairs ``seeds``."""
        picked = [costs[rid] for rid, _ in seeds]
        notes = [f"{len(seeds)} seed(s)"]
        reference = sum(c.reference or 0.0 for c in picked)
        if self.calibration is None:
            text = f"{reference:,.1f}"
        else:
            packed = sum(c.packed or 0.0 for c in picked)
            single = sum(c.single or 0.0 for c in picked)
            text = f"{packed:,.1f} / {single:,.1f} / {reference:,.1f}"
            fallback = sum(1 for c in picked if not c.measured and c.packed is not None)
            if fallback:
                notes.append(f"{fallback} not calibrated")
        unknown = sum(1 for c in picked if c.packed is None)
        if unknown:
            notes.append(f"{unknown} with no time at all")
        return f"{text} ({', '.join(notes)})"


def _cache_key(tables_dir: Path, recipes_dir: Path, defaults: dict[str, Any] | None) -> str:
    """What the expanded plan depends on: the content of every spec and recipe file and of
    imgclf's code (its schema defaults resolve the configs and name the runs), and the
    workflow's resource defaults. Hashing ~150 small files takes a few milliseconds."""
    import imgclf

    h = hashlib.sha256(json.dumps([CACHE_FORMAT, imgclf.__version__, defaults or {}], sort_keys=True,
                                  default=str).encode())
    files = [*tables_dir.glob("*.yaml"), *(f for f in recipes_dir.rglob("*") if f.is_file()),
             *Path(imgclf.__file__).parent.rglob("*.py")]
    for f in sorted(files):
        h.update(f"\0{f}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _validator(schema: str | Path):
    import jsonschema
    import yaml

    return jsonschema.Draft202012Validator(yaml.safe_load(Path(schema).read_text(encoding="utf-8")))


def _check_schema(validator, path: Path) -> None:
    from imgclf import config as C

    try:
        data = C.load_yaml(path)
    except C.ConfigError as e:
        raise S.SpecError(str(e)) from None
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.path) or "top level"
        raise S.SpecError(f"{path}: {where}: {error.message}")
