# Everything that is not a rule: config validation, the table specs read once and
# expanded into runs, and the small input functions the rules use.
import sys
from pathlib import Path

from snakemake.utils import validate

from imgclf.tables import plan as imgclf_plan
from imgclf.tables.spec import SpecError


validate(config, "../schemas/config.schema.yaml")

TABLES_DIR = Path("config/tables")
RECIPES_DIR = Path("config/recipes")
RUNS_DIR = Path("results/runs")

# imgclf.tables.spec validates every spec fully (keys, types, recipes, resolved configs);
# workflow/schemas/table.schema.yaml documents the format for editors and is checked in tests.
# The expanded plan is kept in .snakemake/ until a spec, a recipe or imgclf itself changes.
try:
    PLAN = imgclf_plan.Plan.cached(".snakemake/imgclf/plan.json", TABLES_DIR, RECIPES_DIR,
                                   defaults=config.get("resources", {}))
except SpecError as e:
    raise WorkflowError(str(e)) from None
for name in config["tables"]:
    if name not in PLAN.tables:
        raise WorkflowError(
            f"config/config.yaml: tables: '{name}' has no config/tables/{name}.yaml "
            f"(known: {', '.join(sorted(PLAN.tables))})"
        )
print(PLAN.summary(RUNS_DIR), file=sys.stderr)


# A run id is <dataset>-<model>-<config hash>; its dataset part names the dataset cache it reads.
wildcard_constraints:
    dataset=r"[a-z0-9]+",
    run=r"[a-z_]+-[0-9a-f]{8}",
    seed=r"\d+",
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
    """What a training job needs: the resolved config, the cluster resources (profile/config
    SLURM settings, then the config's defaults, then the row's own needs) and the launcher."""
    run = get_run(wildcards)
    return {
        "config": run.config,
        "resources": {**config.get("slurm", {}), **run.resources},
        "launcher": config["launcher"],
        "data_root": config.get("data_root", ""),
        "progress": config.get("progress", True),
    }


def get_table_seeds(wildcards):
    if wildcards.table not in PLAN.tables:
        raise WorkflowError(f"no table spec config/tables/{wildcards.table}.yaml")
    return PLAN.seed_files(wildcards.table, RUNS_DIR)
