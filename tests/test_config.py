import pytest

from imgclf import config as C

REF = "config/recipes/cifar/resnet_preact.yaml"


def test_reference_readme_command_parses_exactly():
    args = ("model.resnet_preact.depth 20 train.base_lr 0.2 scheduler.type cosine train.batch_size 512 "
            "augmentation.use_ricap True augmentation.use_random_crop False "
            "model.resnet_preact.preact_stage [True,False,False] train.output_dir experiments/x/exp00").split()
    cfg = C.build(REF, C.parse_overrides(args))
    assert cfg.model.resnet_preact.depth == 20
    assert cfg.train.base_lr == 0.2 and isinstance(cfg.train.base_lr, float)
    assert cfg.scheduler.type == "cosine"
    assert cfg.train.batch_size == 512
    assert cfg.augmentation.use_ricap is True and cfg.augmentation.use_random_crop is False
    assert cfg.model.resnet_preact.preact_stage == [True, False, False]
    assert cfg.train.output_dir == "experiments/x/exp00"


def test_key_equals_value_and_quoted_lists():
    o = C.parse_overrides(["train.base_lr=0.05", "scheduler.milestones", "[60, 120, 160]",
                           "model.resnet_preact.preact_stage", "'[True, False, False]'"])
    assert o["train.base_lr"] == 0.05 and o["scheduler.milestones"] == [60, 120, 160]
    cfg = C.build(REF, o)
    assert cfg.model.resnet_preact.preact_stage == [True, False, False]


def test_int_widens_to_float_but_not_to_bool():
    assert C.build(REF, {"train.base_lr": 1}).train.base_lr == 1.0
    with pytest.raises(C.ConfigError, match="train.nesterov: expected bool"):
        C.build(REF, {"train.nesterov": 1})


@pytest.mark.parametrize("overrides, message", [
    ({"train.base_lrr": 0.1}, "unknown config key 'train.base_lrr'; did you mean 'train.base_lr'"),
    ({"model.resnet_preact.dept": 20}, "did you mean 'model.resnet_preact.depth'"),
    ({"train.base_lr": "fast"}, "train.base_lr: expected float, got 'fast'"),
    ({"train.batch_size": 12.5}, "train.batch_size: expected int"),
    ({"scheduler.type": "cosin"}, "did you mean 'cosine'"),
    ({"train.base_lr": -0.1}, "train.base_lr: must be > 0"),
    ({"augmentation.use_mixup": True, "augmentation.use_cutmix": True}, "cannot be combined"),
    ({"train.batch_size": 100, "train.subdivision": 3}, "does not divide"),
    ({"model.name": "resnet_preactt"}, "did you mean 'resnet_preact'"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        C.build(REF, overrides)


def test_missing_recipe_names_the_file(tmp_path):
    with pytest.raises(C.ConfigError, match="nope.yaml: file not found"):
        C.build(tmp_path / "nope.yaml")


def test_recipe_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  base_lr: 0.1\n  bach_size: 3\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml: unknown config key 'train.bach_size'"):
        C.build(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml \(line \d+\): not valid YAML"):
        C.build(bad)


def test_precision_aliases_normalize_and_hash_equal():
    a = C.build(REF, {"train.precision": "O1"})
    b = C.build(REF, {"train.precision": "amp"})
    assert a.train.precision == "amp" and C.config_hash(a) == C.config_hash(b)


def test_hash_ignores_seed_and_paths_but_not_hyperparameters():
    base = C.build(REF)
    same = C.build(REF, {"train.seed": 3, "train.output_dir": "x", "data_root": "/d"})
    other = C.build(REF, {"train.base_lr": 0.2})
    assert C.config_hash(base) == C.config_hash(same) != C.config_hash(other)


def test_resolved_config_round_trips():
    cfg = C.build(REF, {"train.base_lr": 0.3, "augmentation.use_cutout": True})
    import yaml

    assert C.from_dict(yaml.safe_load(C.to_yaml(cfg))) == cfg
