# Everything that is not a rule: config validation, the table specs read once and
# expanded into runs, and the small input functions the rules use.
import sys
import time
from pathlib import Path

import yaml
from snakemake.utils import validate

from imgclf import cost as imgclf_cost
from imgclf import launch as imgclf_launch
from imgclf import records as imgclf_records
from imgclf.launch import jobs as imgclf_jobs
from imgclf.launch.resources import ResourceError
from imgclf.tables import plan as imgclf_plan
from imgclf.tables.spec import SpecError


def typed(value, schema):
    """`--config 'resources={gpus: 1}'` reaches us as {'gpus': '1'}: Snakemake types only top-level
    values. Parse the strings that the schema says are numbers or booleans."""
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: typed(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, str) and kind in ("integer", "number", "boolean"):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (int, float, bool)) else value
    return value


CONFIG_SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
config.update(typed(dict(config), yaml.safe_load(Path(CONFIG_SCHEMA).read_text(encoding="utf-8"))))
validate(config, "../schemas/config.schema.yaml")
# The launcher registry, not the schema, knows the launchers (a module may register more).
try:
    LAUNCHER = imgclf_launch.get(config["launcher"])
    # Every value that reaches an sbatch script is checked here, at planning, not at submission.
    for section in ("resources", "slurm"):
        imgclf_launch.Resources.from_dict(config.get(section, {}), "config", section)
except ValueError as e:
    raise WorkflowError(str(e) if isinstance(e, ResourceError) else f"config: {e}") from None
STARTED = time.time()

TABLES_DIR = Path("config/tables")
RECIPES_DIR = Path("config/recipes")
RUNS_DIR = Path("results/runs")

# imgclf.tables.spec validates every spec fully (keys, types, recipes, resolved configs);
# workflow/schemas/table.schema.yaml documents the format for editors and is checked in tests.
# The expanded plan is kept in .snakemake/ until a spec, a recipe or imgclf itself changes.
try:
    PLAN = imgclf_plan.Plan.cached(".snakemake/imgclf/plan.json", TABLES_DIR, RECIPES_DIR,
                                   defaults=config.get("resources", {}))
except (SpecError, ResourceError) as e:
    raise WorkflowError(str(e)) from None
for name in config["tables"]:
    if name not in PLAN.tables:
        raise WorkflowError(
            f"config/config.yaml: tables: '{name}' has no config/tables/{name}.yaml "
            f"(known: {', '.join(sorted(PLAN.tables))})"
        )
# Seeds of runs that ask for seeds_per_gpu k > 1, k to a job (imgclf.launch.pack).
PACKS = PLAN.packs()
PACK_OF = {member: pack for pack, members in PACKS.items() for member in members}
PACKS_DIR = Path("results/packs")

# GPU-hours from measured img/s (`imgclf calibrate`) where the file covers a run. Read on every
# invocation, outside the plan's cache: a new calibration changes the figures and the priorities.
CALIBRATION_FILE = config.get("calibration", imgclf_cost.DEFAULT_PATH)
try:
    PLAN.use_calibration(imgclf_cost.load_calibration(CALIBRATION_FILE), CALIBRATION_FILE)
except ValueError as e:
    raise WorkflowError(f"config: calibration: {e}") from None
print(PLAN.summary(RUNS_DIR), file=sys.stderr)
print(LAUNCHER.describe(config.get("resources", {})), file=sys.stderr)


# A run id is <dataset>-<model>-<config hash>; its dataset part names the dataset cache it reads.
wildcard_constraints:
    dataset=r"[a-z0-9]+",
    run=r"[a-z_]+-[0-9a-f]{8}",
    seed=r"\d+",
    pack=r"k\d+-[0-9a-f]{8}",
    table=r"[a-z0-9_]+",


def table_outputs(name):
    """What one table renders: Markdown, HTML and the report's two figures."""
    return [
        f"results/tables/{name}.md",
        f"results/tables/{name}.html",
        f"results/tables/{name}/learning_curves.png",
        f"results/tables/{name}/paper_vs_ours.png",
    ]


def get_final_output():
    return [path for name in config["tables"] for path in table_outputs(name)]


def get_all_tables():
    return [path for name in sorted(PLAN.tables) for path in table_outputs(name)]


def get_report_labels(figure):
    """Labels of one table's entries in `snakemake --report`."""
    return {"table": "{table}", "figure": figure}


def get_run(wildcards):
    run_id = f"{wildcards.dataset}-{wildcards.run}"
    if run_id not in PLAN.runs:
        raise WorkflowError(f"run '{run_id}' belongs to no row of config/tables/*.yaml")
    return PLAN.runs[run_id]


def get_train_job(wildcards):
    """What a training job needs: the resolved config, the cluster resources (config/config.yaml,
    then the profile's --configfile, then --config; a row's own `resources:` replace them) and
    the launcher. A device the job will not have (fp16 without a GPU) fails here, at planning."""
    run = get_run(wildcards)
    resources = {**config.get("slurm", {}), **run.resources}
    problem = LAUNCHER.can_run(run.config, int(resources.get("gpus", 0) or 0))
    if problem:
        raise WorkflowError(f"{', '.join(run.rows)}: {problem}")
    return {
        "config": run.config,
        "resources": resources,
        "launcher": config["launcher"],
        "data_root": config.get("data_root", ""),
        "progress": config.get("progress", True),
    }


def get_pack(wildcards):
    pack_id = f"{wildcards.dataset}-{wildcards.pack}"
    if pack_id not in PACKS:
        raise WorkflowError(f"pack '{pack_id}' is no pack of this plan (seeds_per_gpu may have changed)")
    return PACKS[pack_id]


def get_pack_job(wildcards):
    """A pack's seeds (run directory, resolved config, seed) and its job's resources (those of one
    seed; the job asks for k times its CPUs and memory)."""
    members = get_pack(wildcards)
    seeds = [(str(RUNS_DIR / run_id / f"seed{seed}"), PLAN.runs[run_id].config, seed) for run_id, seed in members]
    run = PLAN.runs[members[0][0]]
    resources = {**config.get("slurm", {}), **run.resources}
    problem = LAUNCHER.can_run(run.config, int(resources.get("gpus", 0) or 0))
    if problem:
        raise WorkflowError(f"{', '.join(run.rows)}: {problem}")
    return {"seeds": seeds, "resources": resources, "launcher": config["launcher"],
            "data_root": config.get("data_root", "")}


def get_pack_threads(wildcards):
    members = get_pack(wildcards)
    run = PLAN.runs[members[0][0]]
    return len(members) * LAUNCHER.local_cores(int(run.config["train"].get("threads", 1)), run.resources)


def get_train_priority(wildcards):
    """Cheapest runs first, all seeds of a run together (imgclf.tables.plan.Plan.priority)."""
    return PLAN.priority(get_run(wildcards).run_id)


def get_pack_priority(wildcards):
    """A pack runs when its most expensive run would: packs of cheap runs first."""
    return min(PLAN.priority(run_id) for run_id, _ in get_pack(wildcards))


def get_table_priority(wildcards):
    """Above every training job: a table whose seeds are done is aggregated and rendered at once,
    not after every cheaper seed of the campaign (the scheduler takes the highest priority first)."""
    return len(PLAN.runs) + 1


def get_train_threads(wildcards):
    """The cores a training job takes here: its torch threads (train.threads) x its ranks on this
    machine; none under SLURM, where this job only waits."""
    run = get_run(wildcards)
    return LAUNCHER.local_cores(int(run.config["train"].get("threads", 1)), run.resources)


def get_slurm_jobs(wildcards):
    return LAUNCHER.cluster_slots()


def get_attempt(wildcards, attempt):
    return attempt


def print_failures():
    """One line per seed that failed in this invocation (each training log's first line)."""
    failed = []
    for log_file in sorted(Path("logs/train").glob("*/seed*.log")):
        if log_file.stat().st_mtime >= STARTED:
            first = log_file.read_text(encoding="utf-8", errors="replace").partition("\n")[0]
            if first and " test error " not in first and ": diverged: " not in first:
                failed.append(first)
    for log_file in sorted(Path("logs/train/packs").glob("*.log")):  # a pack's log: one line per failed seed
        if log_file.stat().st_mtime >= STARTED:
            head = log_file.read_text(encoding="utf-8", errors="replace").partition("\n\n")[0]
            failed += [line for line in head.splitlines() if line.startswith("FAILED ")]
    failed = [line.removeprefix("FAILED ") for line in failed]
    if failed:
        print(f"imgclf: {len(failed)} seed(s) failed:", *(f"  {line}" for line in failed), sep="\n",
              file=sys.stderr)


def set_aside_corrupt_records(table):
    """A corrupt result.json or eval.json (NaN, a missing key, garbage) is renamed to *.corrupt
    before Snakemake looks at the seed's files: its record missing, the seed's train job runs again
    (resuming from its last checkpoint). Said on one line per file."""
    for row in PLAN.tables[table].rows:
        for seed in row.seeds if row.run_id else ():
            seed_dir = RUNS_DIR / row.run_id / f"seed{seed}"
            for line in imgclf_records.set_aside(seed_dir):
                print(line, file=sys.stderr)


def pack_marker(pack_id):
    return str(PACKS_DIR / pack_id / "seeds.json")


def get_pack_inputs(wildcards):
    """The dataset cache and each seed's folder (or, deleted, the nearest folder above it that
    exists): a seed deleted or set aside as corrupt after the pack's marker was written makes the
    marker older than its inputs, so the pack runs again and trains only the seeds without a record."""
    members = get_pack(wildcards)
    folders = []
    for run_id, seed in members:
        seed_dir = RUNS_DIR / run_id / f"seed{seed}"
        folder = next((d for d in (seed_dir, seed_dir.parent, RUNS_DIR) if d.is_dir()), None)
        if folder is not None and str(folder) not in folders:
            folders.append(str(folder))
    return [f"resources/cache/{wildcards.dataset}.pt", *folders]


def get_table_seeds(wildcards):
    """Every seed's records (see Plan.seed_files); a packed seed's come with its pack's marker."""
    if wildcards.table not in PLAN.tables:
        raise WorkflowError(f"no table spec config/tables/{wildcards.table}.yaml")
    set_aside_corrupt_records(wildcards.table)
    files = PLAN.seed_files(wildcards.table, RUNS_DIR)
    packed = {str(RUNS_DIR / run_id / f"seed{s}" / name): pack for (run_id, s), pack in PACK_OF.items()
              for name in ("result.json", "eval.json")}
    return list(dict.fromkeys(pack_marker(packed[f]) if f in packed else f for f in files))
