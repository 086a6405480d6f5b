"""Config loading: schema defaults, YAML merge, dotted overrides, one-line errors naming the key/file."""
from pathlib import Path

import pytest

from unidml.config import ConfigError, load_config, load_config_text, to_yaml
from unidml.run_config import register_components

register_components()  # the config layer checks registry-backed choices against what is registered

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 0.5, epochs: 3}\neval: {ks: [1, 10]}\n"),
                      ["train.lr=0.01", "model.arch=resnet18", "loss.margin=0.2", "engine.precision=fp32"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3
    assert list(cfg.eval.ks) == [1, 10]
    assert cfg.model.arch == "resnet18"
    assert cfg.loss.margin == 0.2 and cfg.loss.name == "cross_entropy"
    assert cfg.data.synthetic.classes == 100  # schema default kept


@pytest.mark.parametrize("text, overrides, fragment", [
    ("train: {lrr: 0.1}\n", [], "key 'train.lrr'"),
    ("train: {lr: fast}\n", [], "key 'train.lr'"),
    ("", ["train.epochs=1.5"], "key 'train.epochs'"),
    ("", ["nosuch.key=1"], "key 'nosuch"),
    ("", ["data.backend=opencv"], "key 'data.backend'"),
    ("", ["train.batch_size=0"], "key 'train.batch_size'"),
    ("", ["data.val_classes=1.5"], "key 'data.val_classes'"),
    ("", ["eval.ks=[]"], "key 'eval.ks'"),
    ("", ["train.lr"], "expected key=value"),
    ("train: [1, 2\n", [], "invalid YAML"),
    ("- 1\n", [], "top level must be a mapping"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_loss_validator_errors_become_config_errors(tmp_path):
    def validate(section):
        raise ValueError(f"unknown parameter 'marign' for loss '{section['name']}'")
    with pytest.raises(ConfigError, match="key 'loss': unknown parameter 'marign'"):
        load_config(None, ["loss.marign=1"], validate_loss=validate)


def test_resolved_yaml_round_trips():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.epochs=2"])
    again = load_config_text(to_yaml(cfg), source="stored")
    assert again == cfg


def test_every_shipped_config_loads():
    from unidml.losses import validate_loss_params
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path, validate_loss=validate_loss_params)


def test_a_recipe_variant_trains_as_a_config_its_search_space_left_to_the_study():
    cfg = load_config([REPO / "configs" / "quickstart.yaml", REPO / "configs" / "pairwise" / "contrastive.yaml"],
                      ["model.feature_bn=true"])
    assert (cfg.loss.name, cfg.loss.neg_margin, cfg.data.sampler, cfg.model.feature_bn, cfg.train.optimizer) == \
        ("contrastive", 0.5, "m_per_class", True, "adamw")
    assert "search" not in cfg


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", str(2**32)])
def test_a_seed_outside_what_the_generators_take_is_one_line(seed):
    """train.seed=-1 reached NumPy ("expected non-negative integer") and 1e20 torch ("Overflow when
    unpacking long long") as tracebacks; both ends of the accepted range load."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.seed={seed}"])
    assert str(info.value) == (f"override 'train.seed={seed}': key 'train.seed': must be an integer in "
                               f"[0, {2**32 - 1}], got {seed}")
    assert [load_config(None, [f"train.seed={s}"]).train.seed for s in (0, 2**32 - 1)] == [0, 2**32 - 1]


def test_an_error_names_the_override_or_the_file_that_set_the_key(tmp_path):
    """The override that set the bad value is named, not the YAML file; with two files, the one that set it."""
    base = write(tmp_path, "train: {lr: 0.1}\n")
    other = tmp_path / "other.yaml"
    other.write_text("train: {momentum: 1.5}\n")
    with pytest.raises(ConfigError) as info:
        load_config(base, ["train.lr=-0.1"])
    assert str(info.value) == "override 'train.lr=-0.1': key 'train.lr': must be a finite number > 0, got -0.1"
    with pytest.raises(ConfigError) as info:
        load_config([base, other], ["train.lr=0.5"])
    assert str(info.value).startswith(f"{other}: key 'train.momentum': ")

    def refuse(section):
        raise ValueError("unknown parameter 'marign'")

    with pytest.raises(ConfigError, match=r"^override 'loss\.marign=1': key 'loss': unknown parameter"):
        load_config(base, ["loss.marign=1"], validate_loss=refuse)
    with pytest.raises(ConfigError, match=rf"^{base}: key 'train.lr'"):  # set by the file, not by an override
        load_config(write(tmp_path, "train: {lr: -3}\n"), ["train.epochs=1"])
