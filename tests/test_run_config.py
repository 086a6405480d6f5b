"""One composition root and one list per choice (docs/design.md, "Registries" and "The run config").

Every command that reads a config (a file or a checkpoint's) goes through `unidml.run_config`; no other
module calls the config layer's loaders; no choice list of a registry-backed key is written outside its
registrations; and the places that used to disagree (data check's datasets, image extensions) now agree.
"""
from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unidml import registry
from unidml.config import ConfigError
from unidml.launcher.cli import COMMANDS
from unidml.run_config import load_run_config, register_components, stored_run_config

PACKAGE = Path(__file__).resolve().parents[1] / "unidml"
REPO = PACKAGE.parent
register_components()


def _calls(tree: ast.AST) -> set[str]:
    """Names called or imported anywhere in a module (functions, attributes, `from x import name`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        elif isinstance(node, ast.ImportFrom):
            found.update(alias.name for alias in node.names)
    return found


def test_only_the_root_calls_the_config_loaders():
    callers = sorted(str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
                     if path.parent.name != "config" and path.name != "run_config.py"
                     and _calls(ast.parse(path.read_text())) & {"load_config", "load_config_text"})
    assert not callers, f"load the run config with unidml.run_config.load_run_config, not in {callers}"


def _reads_a_config(module_name: str) -> bool:
    """Whether a command takes a config file or a checkpoint (whose stored config it then uses)."""
    parser = argparse.ArgumentParser()
    importlib.import_module(f"unidml.launcher.commands.{module_name}").add_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    return bool(options & {"--config", "--checkpoint"})


@pytest.mark.parametrize("command, module_name", [(path, name) for path, name, _ in COMMANDS])
def test_every_command_reading_a_config_goes_through_the_root(command, module_name):
    if not _reads_a_config(module_name):
        pytest.skip(f"`unidml {command}` reads no config")
    source = PACKAGE / "launcher" / "commands" / f"{module_name}.py"
    tree = ast.parse(source.read_text())
    used = _calls(tree)
    for node in ast.walk(tree):  # a command that is argument parsing plus one call into its library
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unidml.serving"):
            for name in [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]:
                module_file = REPO.joinpath(*name.split(".")).with_suffix(".py")
                if module_file.is_file():
                    used |= _calls(ast.parse(module_file.read_text()))
    assert used & {"load_run_config", "load_for_inference", "stored_run_config"}, \
        f"`unidml {command}` ({source.name}) loads its config outside unidml.run_config"


def test_no_choice_list_of_a_registered_key_is_copied():
    """A tuple/list/set/dict literal naming two or more entries of one registry outside that registry."""
    registries = [registry.DATASETS, registry.DATA_BACKENDS, registry.SAMPLERS, registry.POOLINGS,
                  registry.ENGINE_BACKENDS]
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                strings = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                copies += [f"{path.relative_to(REPO)}:{node.lineno} {sorted(strings & set(r))}"
                           for r in registries if len(strings & set(r)) >= 2]
    assert not copies, "choice lists written outside their registry:\n" + "\n".join(copies)


def test_the_config_accepts_exactly_the_registered_names(monkeypatch):
    assert load_run_config(None, ["data.dataset=glyphs"]).data.dataset == "glyphs"
    with pytest.raises(ConfigError, match=r"key 'data.dataset': 'nope' is not one of sop, .*glyphs"):
        load_run_config(None, ["data.dataset=nope"])
    monkeypatch.setitem(registry.POOLINGS, "mean_max", registry.POOLINGS["avg"])
    assert load_run_config(None, ["model.pooling=mean_max"]).model.pooling == "mean_max"


def test_an_empty_registry_is_a_programming_error_not_a_silent_pass(monkeypatch):
    from unidml.config import load_config

    monkeypatch.setattr(registry.SAMPLERS, "_entries", {})
    with pytest.raises(RuntimeError, match="sampler registry is empty"):
        load_config(None)


def test_a_checkpoints_stored_config_is_checked_like_a_file(tmp_path):
    good = load_run_config(REPO / "configs" / "quickstart.yaml")
    from unidml.config import to_yaml

    text = to_yaml(good).replace("arch: resnet18", "arch: resnet_unknown")
    with pytest.raises(ConfigError, match=r"ck\.pt \(stored config\): model\.arch"):
        stored_run_config({"config": text}, "ck.pt")
    text = to_yaml(good) + "\n"
    assert stored_run_config({"config": text}, "ck.pt", ["train.epochs=1"]).train.epochs == 1


def test_data_check_accepts_every_registered_dataset(tmp_path, capsys):
    from unidml.data_pipeline import build_dataset
    from unidml.launcher import cli

    root = tmp_path / "synthetic"
    build_dataset(load_run_config(None, [f"data.root={root}", "data.synthetic.classes=8",
                                         "data.synthetic.per_class=3", "data.val_classes=0",
                                         "eval.split=test"]).data)
    assert cli.main(["data", "check", "--dataset", "synthetic", "--root", str(root)]) == 0
    assert "status: usable" in capsys.readouterr().out


def test_embed_and_the_folder_reader_read_the_same_image_files(tmp_path):
    from unidml.data_pipeline.readers import IMAGE_EXTENSIONS, read_dataset
    from unidml.serving.image_lists import images_from_folder

    pixels = np.zeros((8, 8, 3), np.uint8)
    for index, suffix in enumerate(IMAGE_EXTENSIONS):
        folder = tmp_path / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{index}{suffix}", format=None if suffix != ".tif" else "TIFF")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    read = [p for split in read_dataset("folder", tmp_path).splits.values() for p in split.paths]
    listed, _ = images_from_folder(tmp_path)
    assert sorted(Path(p).name for p in read) == sorted(Path(p).name for p in listed)
    assert len(listed) == len(IMAGE_EXTENSIONS)
