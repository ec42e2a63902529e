"""`dt-lora train --library`: many concepts on one loaded base, merged exactly and baked, resumable.

Runs are tiny (a few images, a few steps) on the toy world; what a library of shields keeps and removes
is measured by the canvas benchmark, not here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dt_lora import data as data_module
from dt_lora.adapters import read_adapter
from dt_lora.adapters.merge import merge_adapters
from dt_lora.cli import main
from dt_lora.errors import UserError
from dt_lora.io import OUTPUT_MARKER
from dt_lora.recipe import load_recipe
from dt_lora.shield import train as train_module
from dt_lora.shield.library import check_library, train_library

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
CONCEPTS = ("toy-circle", "toy-red", "toy-square")
TINY_FLAGS = ["--target-images", "8", "--anchors-images", "8", "--train-steps", "4", "--train-batch-size", "4",
              "--sampling-steps", "4", "--lora-rank", "2", "--lora-alpha", "2"]


@pytest.fixture
def recipes(tmp_path) -> Path:
    folder = tmp_path / "library"
    folder.mkdir()
    for name in CONCEPTS:
        shutil.copy(ADAPTERS / f"{name}.toml", folder)
    return folder


def tiny(folder: Path, **extra) -> list:
    overrides = {"target.images": "8", "anchors.images": "8", "train.steps": "4", "train.batch_size": "4",
                 "sampling.steps": "4", "lora.rank": "2", "lora.alpha": "2", **extra}
    return [load_recipe(path, overrides) for path in sorted(folder.glob("*.toml"))]


def test_a_library_trains_each_concept_on_one_base_then_merges_exactly_and_bakes(recipes, tmp_path, monkeypatch):
    pipelines = []
    real_train = train_module.train_adapter
    monkeypatch.setattr(train_module, "train_adapter",
                        lambda recipe, out, **k: pipelines.append(k["pipeline"]) or real_train(recipe, out, **k))
    lines = []
    result = train_library(tiny(recipes), recipes, cache_dir=tmp_path / "cache", bake_to=tmp_path / "baked",
                           log=lines.append)

    assert result.trained == list(CONCEPTS) and result.kept == []
    assert len(pipelines) == 3 and all(p is pipelines[0] for p in pipelines)  # the base loaded once
    assert [line.split(":")[0] for line in lines[:3]] == [f"[{i}/3] {name}" for i, name in enumerate(CONCEPTS, 1)]
    assert all("4 steps" in line for line in lines[:3])
    merged = read_adapter(result.merged)
    assert [c["name"] for c in merged.concepts] == list(CONCEPTS)
    exact = merge_adapters(result.adapters).adapter  # what `dt-lora merge` writes: the stack, exactly
    assert merged.weights.keys() == exact.weights.keys()
    for key, weight in exact.weights.items():
        torch.testing.assert_close(merged.weights[key], weight)
    marker = json.loads((tmp_path / "baked" / OUTPUT_MARKER).read_text())
    assert [c["name"] for c in marker["concepts"]] == list(CONCEPTS)


def test_a_library_run_again_keeps_what_is_done_and_resumes_where_it_stopped(recipes, tmp_path, monkeypatch):
    real_train = train_module.train_adapter
    trained = []

    def stop_before_the_second(recipe, out, **kwargs):
        if trained:
            raise KeyboardInterrupt
        trained.append(recipe.name)
        return real_train(recipe, out, **kwargs)

    monkeypatch.setattr(train_module, "train_adapter", stop_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        train_library(tiny(recipes), recipes, cache_dir=tmp_path / "cache", log=lambda line: None)
    first = (recipes / "toy-circle.safetensors").read_bytes()
    assert not (recipes / "merged.safetensors").exists()

    monkeypatch.setattr(train_module, "train_adapter", real_train)
    lines = []
    result = train_library(tiny(recipes), recipes, cache_dir=tmp_path / "cache", log=lines.append)
    assert result.kept == ["toy-circle"] and result.trained == ["toy-red", "toy-square"]
    assert (recipes / "toy-circle.safetensors").read_bytes() == first  # nothing finished is redone
    assert "kept" in lines[0]

    monkeypatch.setattr(train_module, "train_adapter", lambda *a, **k: pytest.fail("trained again"))
    lines.clear()
    again = train_library(tiny(recipes), recipes, cache_dir=tmp_path / "cache", log=lines.append)
    assert again.kept == list(CONCEPTS) and lines[-1] == f"merged: {recipes / 'merged.safetensors'} is up to date"


def test_a_changed_recipe_is_refused_before_any_work_and_replaced_with_overwrite(recipes, tmp_path, monkeypatch):
    train_library(tiny(recipes), recipes, cache_dir=tmp_path / "cache", log=lambda line: None)
    before = read_adapter(recipes / "merged.safetensors").concepts
    changed = tiny(recipes, **{"train.seed": "1"})[:1] + tiny(recipes)[1:]  # toy-circle's recipe changed

    monkeypatch.setattr(data_module, "generate_images", lambda *a, **k: pytest.fail("generated images"))
    with pytest.raises(UserError, match="toy-circle.safetensors exists; pass --overwrite"):
        train_library(changed, recipes, cache_dir=tmp_path / "cache", log=lambda line: None)
    monkeypatch.undo()

    result = train_library(changed, recipes, cache_dir=tmp_path / "cache", overwrite=True, log=lambda line: None)
    assert result.trained == ["toy-circle"] and result.kept == ["toy-red", "toy-square"]
    after = read_adapter(recipes / "merged.safetensors").concepts
    assert after[1:] == before[1:] and after[0]["train"]["seed"] == 1


def test_a_library_that_cannot_be_trained_as_one_is_refused_in_one_line(recipes, tmp_path, capsys):
    circle, red, square = tiny(recipes)
    with pytest.raises(UserError, match="concept 'toy-red' is in the library twice \\(recipes 2 and 3\\)"):
        check_library([circle, red, red])
    with pytest.raises(UserError, match="different bases \\(toy, toy-sdxl\\)"):
        check_library([circle, load_recipe(ADAPTERS / "toy-red.toml", {"base": "toy-sdxl"})])

    (recipes / "again.toml").write_text((recipes / "toy-red.toml").read_text())  # a second file, the same name
    code = main(["train", "--library", str(recipes), *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'toy-red' is in the library twice" in err
    assert sorted(p.name for p in recipes.iterdir()) == ["again.toml", *(f"{n}.toml" for n in CONCEPTS)]

    for argv, problem in ((["--library", str(tmp_path / "none")], "no such folder of recipes"),
                          (["--library", str(tmp_path)], "no recipes (*.toml)"),
                          ([str(ADAPTERS / "toy-red.toml"), "--bake", str(tmp_path / "m")], "--bake goes with --library")):
        assert main(["train", *argv]) == 2
        assert problem in capsys.readouterr().err


def test_the_cli_prints_a_line_per_concept_and_the_library(recipes, tmp_path, capsys):
    (recipes / "toy-square.toml").unlink()
    out = tmp_path / "shields"
    code = main(["train", "--library", str(recipes), "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 *TINY_FLAGS])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[0].startswith("[1/2] toy-circle: 4 steps") and printed[1].startswith("[2/2] toy-red: 4 steps")
    assert printed[-1].startswith("library: 2 trained, 0 kept") and str(out / "merged.safetensors") in printed[-1]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["merged.safetensors", "toy-circle.safetensors",
                                                                  "toy-red.safetensors"]
