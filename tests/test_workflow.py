"""The Snakemake workflow end to end on a tiny table: plan, build, no-op, re-run one seed."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY, planned_jobs

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working directory with the repository's recipes and a 2-row x 2-seed tiny table."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "config" / "recipes", root / "config" / "recipes")
    (root / "config" / "tables").mkdir()
    overrides = {k: v for k, v in TINY.items() if k != "scheduler.epochs"}
    table = {"title": "Tiny", "seeds": [0, 1], "rows": [
        {"id": "depth8", "label": "ResNet-preact-8", "recipe": "digits/resnet_preact.yaml",
         "overrides": {**overrides, "scheduler.epochs": 2}, "reported": {"result": 5.0, "paper": "n/a"}},
        {"id": "depth8_lr", "label": "ResNet-preact-8, lr 0.05", "recipe": "digits/resnet_preact.yaml",
         "overrides": {**overrides, "scheduler.epochs": 2, "train.base_lr": 0.05}},
        {"id": "paper_only", "label": "A paper-only row", "recipe": "digits/resnet_preact.yaml",
         "train": False, "reported": {"paper": "1.23"}},
    ]}
    (root / "config" / "tables" / "tiny.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["tiny"], progress=False)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def snakemake(project, *args, check=True):
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(project / "resources" / "cache")}
    out = subprocess.run([*SNAKEMAKE, "--directory", str(project), "--cores", "2", *args], cwd=project,
                         env=env, capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_workflow_builds_reruns_one_seed_and_is_idempotent(project):
    dry = snakemake(project, "-n")
    assert planned_jobs(dry) == {"data": 1, "train": 4, "aggregate": 1, "render": 1, "plots": 1, "all": 1}
    assert "imgclf plan: 1 tables, 3 rows -> 2 distinct runs, 4 run-seeds (0 done, 4 to train)" in dry.stderr

    snakemake(project)
    md = (project / "results" / "tables" / "tiny.md").read_text()
    assert "| ResNet-preact-8 " in md and "A paper-only row" in md
    assert "Test Error (median of 2 runs)" in md
    csv = (project / "results" / "tables" / "tiny.csv").read_text().splitlines()
    assert len(csv) == 4 and all(",2,2," in line for line in csv[1:3])  # n_seeds, n_done
    assert planned_jobs(snakemake(project, "-n")) == {}

    runs = sorted((project / "results" / "runs").iterdir())
    victim = runs[0] / "seed1" / "result.json"
    survivor = runs[1] / "seed1" / "result.json"
    before = survivor.stat().st_mtime_ns
    victim.unlink()
    assert planned_jobs(snakemake(project, "-n")) == {"train": 1, "aggregate": 1, "render": 1, "plots": 1, "all": 1}
    snakemake(project)
    assert victim.is_file() and survivor.stat().st_mtime_ns == before

    # `rm -r` of a seed's folder is picked up by the table target, and only that seed re-runs.
    shutil.rmtree(runs[1] / "seed0")
    assert planned_jobs(snakemake(project, "-n")) == {"train": 1, "aggregate": 1, "render": 1, "plots": 1, "all": 1}
    snakemake(project)
    assert (runs[1] / "seed0" / "eval.json").is_file() and planned_jobs(snakemake(project, "-n")) == {}

    # A lost eval.json re-runs its seed's job, which resumes from the final checkpoint: the
    # weights, the log and the score come back identical, with no epoch trained again.
    seed = runs[1] / "seed1"
    weights, log, score = (seed / "model.pt").read_bytes(), (seed / "train_log.csv").read_text(), \
        json.loads((seed / "eval.json").read_text())
    (seed / "eval.json").unlink()
    assert planned_jobs(snakemake(project, "-n")) == {"train": 1, "aggregate": 1, "render": 1, "plots": 1, "all": 1}
    snakemake(project)
    assert (seed / "model.pt").read_bytes() == weights and (seed / "train_log.csv").read_text() == log
    again = json.loads((seed / "eval.json").read_text())
    assert (again["test_error"], again["test_loss"]) == (score["test_error"], score["test_loss"])


def test_one_seed_target_builds_alone(project):
    run = sorted((project / "results" / "runs").iterdir())[0]
    out = snakemake(project, "-n", str(run.relative_to(project) / "seed0" / "eval.json"), "--forcerun", "train")
    assert planned_jobs(out) == {"train": 1}


def test_malformed_table_fails_at_planning_with_one_line(project, tmp_path):
    bad = project / "config" / "tables" / "broken.yaml"
    bad.write_text("title: x\nrows:\n  - {id: a, label: A, recipe: digits/nope.yaml}\n")
    try:
        out = snakemake(project, "-n", check=False)
    finally:
        bad.unlink()
    assert out.returncode != 0
    assert "broken.yaml: row 'a': recipe 'digits/nope.yaml' not found" in out.stdout + out.stderr
    assert not (project / "results" / "tables" / "broken.md").exists()


def test_conda_env_pins_match_pyproject():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "imgclf.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)


def test_every_table_spec_satisfies_the_json_schema():
    """The schema documents the spec format for editors; the loader checks the rest."""
    from imgclf.tables import plan

    tables = plan.Plan.from_dir(REPO / "config" / "tables", REPO / "config" / "recipes",
                                schema=REPO / "workflow" / "schemas" / "table.schema.yaml").tables
    assert len(tables) >= 47


def _plan_view(p):
    """Everything the workflow reads from a plan."""
    tables = {n: [(r.id, r.label, r.run_id, r.seeds, r.reported, r.cells) for r in t.rows] for n, t in p.tables.items()}
    runs = {k: (r.dataset, r.config, r.resources, r.seeds, r.rows, r.reported_hours) for k, r in p.runs.items()}
    return tables, runs


def test_plan_cache_is_the_plan_and_follows_every_input(tmp_path, monkeypatch):
    from imgclf.tables import plan, spec

    tables_dir, recipes_dir = tmp_path / "tables", tmp_path / "recipes"
    shutil.copytree(REPO / "config" / "recipes", recipes_dir)
    tables_dir.mkdir()
    for name in ("cifar10", "lars_1024", "quickstart"):
        shutil.copy(REPO / "config" / "tables" / f"{name}.yaml", tables_dir)
    cache = tmp_path / "cache" / "plan.json"
    fresh = plan.Plan.from_dir(tables_dir, recipes_dir, {"gpus": 1})
    first = plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 1})
    assert cache.is_file() and _plan_view(first) == _plan_view(fresh)
    assert first.summary(tmp_path) == fresh.summary(tmp_path)

    loads = []
    real_load = spec.load
    monkeypatch.setattr(spec, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    hit = plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 1})
    assert loads == [] and _plan_view(hit) == _plan_view(fresh)
    assert hit.seed_files("cifar10", "results/runs") == fresh.seed_files("cifar10", "results/runs")

    # A changed default, a changed spec or a changed recipe resolves everything again.
    assert plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 2}).runs and len(loads) == 3
    quick = tables_dir / "quickstart.yaml"
    quick.write_text(quick.read_text().replace('title: "', 'title: "(edited) ', 1))
    edited = plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 2})
    assert len(loads) == 6 and edited.tables["quickstart"].title.startswith("(edited)")
    recipe = recipes_dir / "digits" / "resnet_preact.yaml"
    recipe.write_text(recipe.read_text().replace("base_lr: 0.1\n", "base_lr: 0.125\n"))
    changed = plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 2})
    assert len(loads) == 9 and set(changed.runs) != set(edited.runs)  # new configs, new run ids

    # A corrupt cache is resolved again and rewritten; a bad spec fails, and is never cached.
    cache.write_text("{not json")
    assert _plan_view(plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 2})) == _plan_view(changed)
    json.loads(cache.read_text())
    (tables_dir / "broken.yaml").write_text("title: x\nrows: []\n")
    for _ in range(2):
        with pytest.raises(spec.SpecError, match="broken.yaml: 'rows' must be a non-empty list"):
            plan.Plan.cached(cache, tables_dir, recipes_dir, {"gpus": 2})


def test_fp16_on_a_job_without_gpu_is_refused_by_a_dry_run(project):
    spec = project / "config" / "tables" / "half.yaml"
    spec.write_text(yaml.safe_dump({"title": "Half", "seeds": [0], "rows": [
        {"id": "o3", "label": "fp16", "recipe": "digits/resnet_preact.yaml", "overrides": {"train.precision": "O3"}}]}))
    try:
        out = snakemake(project, "-n", "--config", "launcher=slurm", "tables=[half]", check=False)
    finally:
        spec.unlink()
    assert out.returncode != 0
    assert ("half/o3: its job gets no GPU (resources.gpus is 0), and train.precision fp16 needs a CUDA device"
            in out.stdout + out.stderr)


def test_a_row_that_can_never_start_is_refused_by_a_dry_run(project):
    spec = project / "config" / "tables" / "big.yaml"
    spec.write_text(yaml.safe_dump({"title": "Big", "seeds": [0], "rows": [
        {"id": "too_big", "label": "batch too large", "recipe": "digits/resnet_preact.yaml",
         "overrides": {"train.batch_size": 4096}}]}))
    try:
        out = snakemake(project, "-n", "--config", "tables=[big]", check=False)
    finally:
        spec.unlink()
    assert out.returncode != 0
    assert ("config/tables/big.yaml: row 'too_big': train.batch_size: 4096 is larger than the 1347 training images "
            "of digits" in out.stdout + out.stderr)


def test_cluster_profile_composes_with_command_line_config_from_a_subdirectory(tmp_path):
    """--config adds to the profile's settings (it used to replace them: launcher=slurm was lost),
    nested values are typed, and the profile works from a subdirectory of the checkout."""
    root = tmp_path / "checkout"
    for name in ("config", "slurm", "workflow"):
        shutil.copytree(REPO / name, root / name)
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache")}
    out = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "../slurm", "-n", "results/tables/quickstart.md",
                          "--config", "progress=False", "resources={gpus: 2, mem_gb: 3.5, time_min: 30}"],
                         cwd=root / "config", env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("imgclf launcher: slurm (each seed one submitit job; by default 2 GPU(s), 8 CPU(s), 3.5 GB per task, "
            "30 min;") in out.stderr
    assert planned_jobs(out) == {"data": 1, "train": 9, "aggregate": 1, "render": 1}
    # Jobs that only wait on SLURM take no login-node core (the workflow profile's `cores: all`
    # bounded them to one per core): the profile's slurm_jobs bounds them instead.
    assert out.stdout.count("threads: 0") == 9 and out.stdout.count("slurm_jobs=1") == 9
    assert yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())["resources"] == {"slurm_jobs": 200}
