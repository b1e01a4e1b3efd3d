"""One preflight (runs.preflight) for every entry point: a config whose job could never run to
the end is refused by `imgclf train`, by planning (so `snakemake -n` names the table, row and
key) and by the workflow's training job before it submits, never inside a job after a queue wait."""
from __future__ import annotations

import pytest
import yaml
from conftest import DIGITS, RECIPES, TINY

from imgclf import config as C, pipeline, runs
from imgclf.tables import plan as P, spec as S

TOO_BIG = {**TINY, "train.batch_size": 4096}  # the digits have 1,347 training images


def _tables(tmp_path, rows):
    d = tmp_path / "tables"
    d.mkdir()
    (d / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], "rows": rows}, sort_keys=False))
    return d


def test_planning_refuses_a_row_with_a_batch_larger_than_its_dataset(tmp_path):
    tables = _tables(tmp_path, [
        {"id": "fine", "label": "ok", "recipe": "digits/resnet_preact.yaml", "overrides": TINY},
        {"id": "too_big", "label": "batch too large", "recipe": "digits/resnet_preact.yaml", "overrides": TOO_BIG}])
    with pytest.raises(S.SpecError) as e:
        P.Plan.from_dir(tables, RECIPES)
    assert str(e.value) == (f"{tables / 't.yaml'}: row 'too_big': train.batch_size: 4096 is larger than the 1347 "
                            "training images of digits")


def test_planning_refuses_ranks_that_do_not_divide_the_batch(tmp_path):
    rows = [{"id": "three_gpus", "label": "3 GPUs", "recipe": "digits/resnet_preact.yaml", "overrides": TINY,
             "resources": {"gpus": 3}}]
    with pytest.raises(S.SpecError, match=r"row 'three_gpus': train\.batch_size: 128 is not divisible by its 3 "
                                          r"ranks x train\.subdivision 1; choose a multiple of 3$"):
        P.Plan.from_dir(_tables(tmp_path, rows), RECIPES)


def test_a_paper_only_row_is_never_refused_for_its_job(tmp_path):
    rows = [{"id": "paper", "label": "paper only", "recipe": "digits/resnet_preact.yaml", "overrides": TOO_BIG,
             "train": False}]
    assert P.Plan.from_dir(_tables(tmp_path, rows), RECIPES).runs == {}


def test_the_workflow_job_refuses_before_writing_anything(tmp_path):
    run_dir = tmp_path / "runs" / "x" / "seed0"
    with pytest.raises(C.ConfigError, match="train.batch_size: 4096 is larger than the 1347 training images"):
        pipeline.train_seed(run_dir, C.build(DIGITS, TOO_BIG).to_dict(), 0, progress=False)
    assert not (tmp_path / "runs").exists()


def test_preflight_builds_the_model_optimizer_and_schedule_only_when_asked():
    cfg = C.build(DIGITS, TINY)
    cfg.model.resnet_preact.depth = 21  # past resolution's checks: only the builder can refuse it now
    runs.preflight(cfg, build=False)
    with pytest.raises(ValueError, match="model.resnet_preact.depth: 21 does not fit block_type 'basic'"):
        runs.preflight(cfg)
