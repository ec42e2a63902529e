"""The toy shields shipped in adapters/ (`python -m worlds.toy.shields` trains them): every toy recipe has
one, it records that recipe and the toy model as they are now, and training a recipe again gives its
shipped weights. Most tests load these files rather than train, so a stale file must fail here."""

from __future__ import annotations

import pytest
import torch
from helpers.lora import SDXL_SHIELDS

from dt_lora.adapters import AdapterFile, read_adapter
from dt_lora.recipe import load_recipe
from dt_lora.recipes import adapter_path, list_recipes, recipe_path

TOY_RECIPES = [name for name in list_recipes() if name.startswith("toy-")]
VOLATILE = ("created", "training_seconds", "dt_lora_version")  # differ from one run to the next
# Relative distance allowed between retrained and shipped weights. Trained here with 1 and 2 threads, they
# were equal bit for bit; other CPUs may round float32 sums differently, which training can amplify a
# little. A change to the training itself moves the weights by tens of percent.
TOLERANCE = 1e-2
RETRAIN = ("run `python -m worlds.toy.shields` (for the SDXL ones: `--base toy-sdxl --out tests/data/sdxl-shields "
           "circle red`) to train the shields again")


@pytest.mark.parametrize("base", ["toy", "toy-sdxl"])
def test_every_toy_recipe_ships_the_shield_it_trains(base, toy_pipeline):
    from dt_lora.base import load_pipeline, unet_fingerprint

    shields = {name: adapter_path(name) for name in TOY_RECIPES} if base == "toy" else {
        path.stem: path for path in SDXL_SHIELDS.glob("toy-*.safetensors")}
    assert len(shields) == (10 if base == "toy" else 2)
    pipeline = toy_pipeline if base == "toy" else load_pipeline(base)
    fingerprint, family = unet_fingerprint(pipeline.unet), "sd1" if base == "toy" else "sdxl"
    for name, path in shields.items():
        shipped = read_adapter(path)
        expected = AdapterFile.from_training({}, recipe=load_recipe(recipe_path(name), {"base": base}), base=base,
                                             base_fingerprint=fingerprint, version="", seconds=0, family=family)
        [record] = shipped.concepts
        [wanted] = expected.concepts
        for key in VOLATILE:
            record.pop(key), wanted.pop(key)
        assert record == wanted, f"{name}: the shipped shield was trained from another recipe or base; {RETRAIN}"
        assert shipped.lora_config == expected.lora_config, name
        assert shipped.weights and all(torch.isfinite(w).all() for w in shipped.weights.values()), name


@pytest.mark.slow  # trains one shield: 1–3 minutes on 2 cores
def test_training_toy_circle_again_gives_its_shipped_weights(toy_pipeline, tmp_path):
    from dt_lora.shield.train import train_adapter

    fresh = train_adapter(load_recipe(recipe_path("toy-circle")), tmp_path / "circle.safetensors",
                          cache_dir=tmp_path / "cache", pipeline=toy_pipeline, progress=False).adapter
    got, shipped = read_adapter(fresh).weights, read_adapter(adapter_path("toy-circle")).weights
    assert got.keys() == shipped.keys()
    for key, weight in shipped.items():
        error = (got[key] - weight).norm() / weight.norm()
        assert error < TOLERANCE, f"{key}: {error:.2e} from the shipped weights; the training changed? {RETRAIN}"
