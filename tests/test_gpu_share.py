"""SLURM's own GPU sharing: resources.gpu_share "shard:N" / "mps:N" becomes --gres=shard:N /
--gres=mps:N in place of the job's one GPU, and every value outside that grammar, or a share
that cannot be one GPU's, is refused with one line (at plan time too)."""
import pytest
import yaml

from conftest import REPO


def _sbatch_lines(res, folder):
    from imgclf.launch.slurm import SlurmLauncher, sbatch_parameters

    # submitit's own rendering of the launcher's executor: the #SBATCH lines the cluster would read
    script = SlurmLauncher().executor(folder, res)._executor._make_submission_file_text("true", "uid")
    return sbatch_parameters(res), [line for line in script.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("share", ["shard:2", "mps:50"])
def test_a_gpu_share_becomes_the_jobs_gres_in_place_of_its_gpu(share, tmp_path):
    from imgclf.launch import Resources

    params, lines = _sbatch_lines(Resources(gpus=1, gpu_share=share), tmp_path)
    assert params["slurm_gres"] == share and "gpus_per_node" not in params
    assert f"#SBATCH --gres={share}" in lines
    assert not any("--gpus" in line for line in lines), lines


def test_without_a_share_the_job_asks_for_whole_gpus(tmp_path):
    from imgclf.launch import Resources

    params, lines = _sbatch_lines(Resources(gpus=1), tmp_path)
    assert params["gpus_per_node"] == 1 and "slurm_gres" not in params
    assert "#SBATCH --gpus-per-node=1" in lines and not any("--gres" in line for line in lines)


@pytest.mark.parametrize("value, said", [
    ("shard:0", r"'shard:0' is not a GPU share"),
    ("shard:10000", r"'shard:10000' is not a GPU share"),
    ("shard:2\n#SBATCH --wrap=x", r"'shard:2\\n#SBATCH --wrap=x' is not a GPU share"),
    ("gpu:1", r"'gpu:1' is not a GPU share"),
    ("mps", r"'mps' is not a GPU share"),
    ("shard: 2", r"'shard: 2' is not a GPU share"),
    ("MPS:50", r"'MPS:50' is not a GPU share"),
    (2, r"2 is not a GPU share"),
])
def test_a_gpu_share_outside_slurms_grammar_is_refused_with_one_line(value, said):
    from imgclf.launch import ResourceError, Resources

    with pytest.raises(ResourceError, match=rf'^r/seed0: resources\.gpu_share: {said}: expected "" \(whole GPUs\), '
                                            r'"shard:N" or "mps:N" with N a whole number in \[1, 9999\]$') as e:
        Resources.from_dict({"gpus": 1, "gpu_share": value}, "r/seed0")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("values, said", [
    ({"gpus": 0}, r"is a share of one GPU, but the job asks for 1 node\(s\) x 0 GPU\(s\)"),
    ({"gpus": 2}, r"is a share of one GPU, but the job asks for 1 node\(s\) x 2 GPU\(s\)"),
    ({"gpus": 1, "nodes": 2}, r"is a share of one GPU, but the job asks for 2 node\(s\) x 1 GPU\(s\)"),
    ({"gpus": 1, "extra": {"gres": "gpu:1"}}, r"asks for the GPU itself; extra\.gres would ask again"),
    ({"gpus": 1, "extra": {"gpus-per-task": 1}}, r"asks for the GPU itself; extra\.gpus-per-task would ask again"),
])
def test_a_share_that_is_not_one_gpus_is_refused(values, said):
    from imgclf.launch import ResourceError, Resources

    with pytest.raises(ResourceError, match=rf"^resources: gpu_share: shard:2 {said}"):
        Resources(**values, gpu_share="shard:2")


def test_a_rows_bad_share_fails_at_planning_naming_the_row(tmp_path):
    from imgclf.tables.plan import Plan
    from imgclf.tables.spec import SpecError

    tables = tmp_path / "tables"
    tables.mkdir()
    rows = [{"id": "bad", "label": "x", "recipe": "digits/resnet_preact.yaml", "resources": {"gpu_share": "shard:x"}},
            {"id": "cpu", "label": "y", "recipe": "digits/resnet_preact.yaml", "resources": {"gpu_share": "mps:25"}}]
    (tables / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], "rows": rows[:1]}))
    with pytest.raises(SpecError, match=r"t\.yaml: row 'bad': resources\.gpu_share: 'shard:x' is not a GPU share"):
        Plan.from_dir(tables, REPO / "config" / "recipes")
    # a well-formed share on a run whose job has no GPU (gpus 0, the default) names the run's row
    (tables / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], "rows": rows[1:]}))
    with pytest.raises(SpecError, match=r"^t/cpu: resources: gpu_share: mps:25 is a share of one GPU, but the job "
                                        r"asks for 1 node\(s\) x 0 GPU\(s\)"):
        Plan.from_dir(tables, REPO / "config" / "recipes", {"gpus": 0})
    plan = Plan.from_dir(tables, REPO / "config" / "recipes", {"gpus": 1})
    assert [r.resources["gpu_share"] for r in plan.runs.values()] == ["mps:25"]


def test_both_schemas_know_the_key():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "table.schema.yaml").read_text())
    config_schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    from imgclf.tables.spec import RESOURCE_KEYS

    assert "gpu_share" in RESOURCE_KEYS
    assert "gpu_share" in config_schema["properties"]["resources"]["properties"]
    import re

    pattern = re.compile(_find(schema, "gpu_share")["pattern"])
    assert [bool(pattern.match(v)) for v in ("", "shard:2", "mps:100", "shard:0", "gpu:1")] == \
        [True, True, True, False, False]


def _find(node, key):
    if isinstance(node, dict):
        if key in node:
            return node[key]
        for v in node.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None
