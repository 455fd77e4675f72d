"""Typed config: YAML + overrides, unknown keys and wrong types fail with the key's name."""
import pytest

from slm_llm.config import Config, ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.jare.targets == ["o_proj"] and cfg.jare.rank == 8
    assert cfg.jare.slots_per_task == 4 and cfg.jare.top_k == 2
    assert cfg.dtkr.groups == 6 and cfg.dtkr.mask_prob == 0.25
    assert cfg.model.dtype == "float32"


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "run_dir: runs/x\ntrain:\n  lr: 0.001\njare:\n  targets: [q_proj, v_proj]\n")
    cfg = load_config(p, ["train.lr=2e-4", "jare.rank=4", "data.tasks=a,b", "train.tensorboard=true"])
    assert cfg.run_dir == "runs/x"
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.jare.rank == 4 and cfg.jare.targets == ["q_proj", "v_proj"]
    assert cfg.data.tasks == ["a", "b"] and cfg.train.tensorboard is True


def test_int_is_accepted_for_float_but_not_str_for_int():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"jare\.rank: expected int, got str 'eight'"):
        load_config(None, ["jare.rank=eight"])


@pytest.mark.parametrize("text, pattern", [
    ("train:\n  lrr: 1\n", r"c\.yaml: unknown key 'train\.lrr'"),
    ("bogus: 1\n", r"unknown key 'bogus'"),
    ("train: 3\n", r"train must be a mapping"),
    ("train:\n  lr: [1]\n", r"train\.lr: expected float"),
    ("jare:\n  targets: [w_proj]\n", r"jare\.targets: 'w_proj' is not one of"),
    ("train:\n  lr: -1\n", r"train\.lr must be > 0"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("train: {lr: 1\n", r"invalid YAML"),
    ("dtkr:\n  ood_background: chat.csv\n", r"dtkr\.ood_background='chat\.csv': use builtin, none, or a \.txt/\.jsonl"),
    ("dtkr:\n  ood_wording_cap: 150\n", r"dtkr\.ood_wording_cap must be in \[0, 100\]"),
    ("data:\n  wordings: 0\n", r"data\.wordings must be > 0"),
])
def test_errors_name_the_key_and_file(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


def test_bad_override_shapes():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"run_dir: expected str"):
        load_config(None, ["run_dir.x=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=2"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "jare.targets=[o_proj,q_proj]"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert again.hash() == cfg.hash() != Config().hash()
