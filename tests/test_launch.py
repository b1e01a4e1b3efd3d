"""Launchers: every value that reaches an sbatch script is one SLURM's grammar allows (checked
before anything is written, at plan time too), a re-attached SLURM job is read from the scheduler
and the run's JSON files (never unpickled), srun gets the job's CPUs, and a launcher registered
from outside the package builds a table through Snakemake."""
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, make_run, planned_jobs

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]


# --------------------------------------------------------------------------- injection into sbatch
@pytest.mark.parametrize("field, value, said", [
    ("partition", "gpu\nrm -rf ~", r"resources\.partition: 'gpu\\nrm -rf ~' is not a SLURM name"),
    ("account", "proj\x1b[2J", r"resources\.account: .* is not a SLURM name"),
    ("account", "proj\r", r"resources\.account: 'proj\\r' is not a SLURM name"),
    ("qos", "high; touch /tmp/x", r"resources\.qos: 'high; touch /tmp/x' is not a SLURM name"),
    ("qos", "a b", r"resources\.qos: 'a b' is not a SLURM name \(letters, digits"),
])
def test_a_name_that_is_not_slurms_is_refused_with_one_line(field, value, said):
    from imgclf.launch import ResourceError, Resources

    with pytest.raises(ResourceError, match=f"^resources: {said}") as e:
        Resources(**{field: value})
    assert "\n" not in str(e.value)


def test_an_extra_value_with_a_newline_is_refused():
    from imgclf.launch import ResourceError, Resources

    with pytest.raises(ResourceError, match=r"^r/seed0: resources\.extra\.constraint: 'a100\\n"
                                            r"echo pwned' is not an sbatch option value"):
        Resources.from_dict({"extra": {"constraint": "a100\necho pwned"}}, "r/seed0")
    assert Resources(extra={"constraint": "a100|h100", "exclusive": True, "nice": 10}).extra["nice"] == 10


@pytest.mark.parametrize("key", ["wrap", "output", "chdir", "export", "constraint\n#SBATCH --wrap", 3])
def test_an_extra_key_that_is_not_a_known_sbatch_option_is_refused(key):
    from imgclf.launch import ResourceError, Resources

    with pytest.raises(ResourceError, match=r"^resources: resources\.extra: unknown sbatch option .* \(known: "
                                            r"acctg_freq, begin, "):
        Resources(extra={key: "x"})


def test_a_job_name_with_a_newline_is_refused_before_submitting(tmp_path):
    from imgclf.launch import ResourceError, submit

    with pytest.raises(ResourceError, match=r"job name: 'r/seed0\\n#SBATCH --wrap=x' is not a job name"):
        submit(tmp_path, "slurm", job_name="r/seed0\n#SBATCH --wrap=x")
    assert not (tmp_path / "submitit").exists()


def test_a_bad_resource_reaches_nothing_on_disk(tmp_path):
    """pipeline.train_seed checks the row's resources before it writes the run directory."""
    from imgclf import config as C
    from imgclf.launch import ResourceError
    from imgclf.pipeline import train_seed

    cfg = C.build(REPO / "config" / "recipes" / "digits" / "resnet_preact.yaml", TINY).to_dict()
    run_dir = tmp_path / "runs" / "r" / "seed0"
    with pytest.raises(ResourceError, match=r"^r/seed0: resources\.partition: 'debug\\nscancel -u me'"):
        train_seed(run_dir, cfg, 0, launcher="slurm", resources={"partition": "debug\nscancel -u me"})
    assert not run_dir.exists()


# --------------------------------------------------------------------------- values at plan time
def _table(tmp_path, resources):
    tables = tmp_path / "tables"
    tables.mkdir(exist_ok=True)
    (tables / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], "rows": [
        {"id": "big", "label": "x", "recipe": "digits/resnet_preact.yaml", "resources": resources}]}))
    return tables


@pytest.mark.parametrize("resources, said", [
    ({"mem_gb": math.nan}, r"resources\.mem_gb: nan is out of range: expected a finite number in \[0\.001, 65536\]"),
    ({"mem_gb": math.inf}, r"resources\.mem_gb: inf is out of range"),
    ({"mem_gb": 0}, r"resources\.mem_gb: 0 is out of range"),
    ({"time_min": 10**9}, r"resources\.time_min: 1000000000 is out of range: expected a finite number in \[1, 525600\]"),
    ({"nodes": 0}, r"resources\.nodes: 0 is out of range"),
    ({"gpus": 1.5}, r"resources\.gpus: expected an integer in \[0, 64\], got 1\.5"),
    ({"partition": "gpu\nsrun rm"}, r"resources\.partition: 'gpu\\nsrun rm' is not a SLURM name"),
])
def test_a_resource_value_sbatch_would_refuse_fails_at_planning(tmp_path, resources, said):
    from imgclf.tables.plan import Plan
    from imgclf.tables.spec import SpecError

    tables = _table(tmp_path, resources)
    with pytest.raises(SpecError, match=rf"t\.yaml: row 'big': {said}") as e:
        Plan.from_dir(tables, REPO / "config" / "recipes")
    assert "\n" not in str(e.value)


def test_a_default_resource_that_is_not_finite_fails_at_planning(tmp_path):
    from imgclf.launch import ResourceError
    from imgclf.tables.plan import Plan

    tables = _table(tmp_path, {})
    with pytest.raises(ResourceError, match=r"^config: resources\.mem_gb: inf is out of range"):
        Plan.from_dir(tables, REPO / "config" / "recipes", {"mem_gb": math.inf})


@pytest.fixture(scope="module")
def dry_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    shutil.copytree(REPO / "config" / "recipes", root / "config" / "recipes")
    (root / "config" / "tables").mkdir()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["t"], progress=False)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _snakemake(root, *args, env=None):
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache"), **(env or {})}
    return subprocess.run([*SNAKEMAKE, "--directory", str(root), "--cores", "2", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_dry_run_refuses_nan_memory_and_an_injected_slurm_option(dry_project):
    """`snakemake -n` passed both; sbatch failed later naming neither row nor key (or ran the line)."""
    (dry_project / "config" / "tables" / "t.yaml").write_text(
        "title: T\nseeds: [0]\nrows:\n  - {id: nan_mem, label: x, recipe: digits/resnet_preact.yaml, "
        "resources: {mem_gb: .nan}}\n")
    out = _snakemake(dry_project, "-n")
    assert out.returncode != 0
    assert "t.yaml: row 'nan_mem': resources.mem_gb: nan is out of range" in out.stdout + out.stderr, out.stdout[-2000:]
    (dry_project / "config" / "tables" / "t.yaml").write_text(
        "title: T\nseeds: [0]\nrows:\n  - {id: ok, label: x, recipe: digits/resnet_preact.yaml}\n")
    out = _snakemake(dry_project, "-n", "--config", "launcher=slurm", 'slurm={extra: {constraint: "a\\nb"}}')
    assert out.returncode != 0
    assert "config: slurm.extra.constraint: 'a\\nb' is not an sbatch option value" in out.stdout + out.stderr, out.stdout[-2000:]
    out = _snakemake(dry_project, "-n", "--config", "launcher=nope")
    assert out.returncode != 0
    assert "config: launcher: 'nope' is not one of debug, local, slurm" in out.stdout + out.stderr, out.stdout[-2000:]


# --------------------------------------------------------------------------- re-attaching, no pickle
class _Boom:
    """Unpickling this runs code: what a pickle planted in a run directory could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _planted(tmp_path, state, monkeypatch):
    """A run directory whose job.json names SLURM job 12 (in ``state`` per a fake sacct/squeue), with
    submitit result pickles that would create ``marker`` if they were ever loaded."""
    run = make_run(tmp_path / "runs" / "r" / "seed0", **{"scheduler.epochs": 1})
    folder = run / "submitit"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in ("12_0_result.pkl", "12_result.pkl"):
        (folder / name).write_bytes(pickle.dumps(("success", _Boom(marker))))
    (folder / "12_0_log.err").write_text("Traceback (most recent call last):\n  File \"x\", line 1\n"
                                         "imgclf.config.ConfigError: train.batch_size: too large\n")
    (run / "job.json").write_text(json.dumps({"launcher": "slurm", "job_id": "12", "tasks": 1, "folder": str(folder)}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sacct", "squeue"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho '12|{state}'\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("IMGCLF_STATE_DIR", str(tmp_path / "state"))
    return run, marker


def test_reattaching_to_a_finished_job_reads_its_json_and_never_unpickles(tmp_path, monkeypatch, capsys):
    from imgclf.launch import Resources, get, jobs

    run, marker = _planted(tmp_path, "RUNNING", monkeypatch)
    result = {"test_error": 3.5, "epochs": 1, "wall_seconds": 1.0}
    (run / "result.json").write_text(json.dumps(result))
    (run / "eval.json").write_text(json.dumps({"test_error": 3.5}))
    assert jobs.launch(run, get("slurm"), Resources(), "r/seed0", True) == result
    assert "re-attached to SLURM job 12 (RUNNING), not submitting another" in capsys.readouterr().err
    assert not marker.exists()


def test_a_reattached_job_that_failed_is_described_from_its_log_without_unpickling(tmp_path, monkeypatch):
    import imgclf.launch.slurm as slurm
    from imgclf.launch import Resources, get, jobs

    run, marker = _planted(tmp_path, "RUNNING", monkeypatch)
    states = iter(["RUNNING", "FAILED", "FAILED"])  # attach, one poll, the failure's state
    monkeypatch.setattr(slurm, "slurm_states", lambda ids, fresh=False: {ids[0]: next(states)})
    with pytest.raises(jobs.JobError, match=r"^r/seed0: SLURM job 12 FAILED: ConfigError: train.batch_size: too "
                                            r"large; log \S+/12_0_log.err$"):
        jobs.launch(run, get("slurm"), Resources(), "r/seed0", True)
    assert not marker.exists()


# --------------------------------------------------------------------------- srun's CPUs
def test_srun_is_given_the_cpus_per_task(tmp_path, monkeypatch):
    """srun of SLURM 22.05-23.02 does not inherit --cpus-per-task: each task got one core."""
    from imgclf.launch import Resources, get

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit refuses to build a SLURM executor without one
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ex = get("slurm").executor(tmp_path, Resources(cpus_per_task=6, tasks=2, partition="cpu"))
    script = ex._executor._make_submission_file_text("python -m x", "uid")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=6" in srun.split()
    assert "#SBATCH --cpus-per-task=6" in script and "#SBATCH --partition=cpu" in script


# --------------------------------------------------------------------------- the registry
def test_the_registry_drives_the_cli_and_names_every_launcher():
    from imgclf import cli, launch

    train = next(a for a in cli.parser()._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "launcher")
    assert tuple(train.choices) == launch.names() == ("debug", "local", "slurm")
    assert train.default == launch.DEFAULT
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert "enum" not in schema["properties"]["launcher"]  # the registry decides, in common.smk


def test_no_launcher_name_is_compared_outside_the_launch_package():
    out = subprocess.run(["grep", "-rnE", r"""["'](debug|local|slurm)["']""", "src", "workflow"], cwd=REPO,
                         capture_output=True, text=True)
    places = [line for line in out.stdout.splitlines() if not line.startswith("src/imgclf/launch/")]
    # the config file's section named `slurm:` is data, not a launcher test
    assert all('config.get("slurm"' in p or '("resources", "slurm")' in p for p in places), places


FAKE = '''
import os
from pathlib import Path

from imgclf.launch import Launcher, register


class _Job:
    """What the seed's life cycle reads of a job: its id, its folder, and rank 0's result."""

    def __init__(self, job_id, folder, fn):
        self.job_id, self._fn = job_id, fn
        self.paths = type("Paths", (), {"folder": folder})()

    def results(self):
        os.environ["FAKE_LAUNCHER_JOB"] = self.job_id
        try:
            return [self._fn()]
        finally:
            del os.environ["FAKE_LAUNCHER_JOB"]


class FakeLauncher(Launcher):
    name = "fake"
    job_kind = "fake job"

    def started(self, env):
        return bool(env.get("FAKE_LAUNCHER_JOB"))

    def submit(self, folder, resources, job_name, task):
        folder = Path(folder)
        folder.mkdir(exist_ok=True)
        return _Job(f"f{os.getpid()}", folder, task)


register(FakeLauncher())
'''


def test_a_launcher_registered_from_outside_builds_the_quickstart_table(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "config" / "recipes", root / "config" / "recipes")
    (root / "config" / "tables").mkdir()
    quick = yaml.safe_load((REPO / "config" / "tables" / "quickstart.yaml").read_text())
    small = {"scheduler.epochs": 1, "model.resnet_preact.initial_channels": 4, "train.batch_size": 256,
             "validation.batch_size": 512}
    for row in quick["rows"]:
        row["overrides"] = {**row["overrides"], **small}
        if "scheduler.milestones" in row["overrides"]:
            row["overrides"]["scheduler.milestones"] = [1]
    quick["seeds"] = [0, 1]
    (root / "config" / "tables" / "quickstart.yaml").write_text(yaml.safe_dump(quick))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["quickstart"], progress=False, launcher="fake")
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fake_launcher.py").write_text(FAKE)
    env = {"IMGCLF_LAUNCHER_MODULES": "fake_launcher",
           "PYTHONPATH": os.pathsep.join([str(plugins), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = _snakemake(root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imgclf launcher: fake (each seed one submitit job;" in out.stderr
    md = (root / "results" / "tables" / "quickstart.md").read_text()
    assert all(row["label"] in md for row in quick["rows"])
    seeds = sorted((root / "results" / "runs").glob("*/seed*"))
    assert len(seeds) == 6 and out.stderr.count("submitted fake job f") == 6
    for seed in seeds:
        assert json.loads((seed / "job.json").read_text())["launcher"] == "fake"
        assert json.loads((seed / "env.json").read_text())["launcher"] == "fake"  # the engine asked the registry
        assert (seed / "eval.json").is_file()
    assert planned_jobs(_snakemake(root, "-n", env=env)) == {}
