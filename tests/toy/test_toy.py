"""The toy world: a real diffusers SD pipeline, an evaluator that agrees with it, and the quality bar.

The quality numbers asserted here are the toy model card's (python/dt_lora/toy/model/README.md),
recomputed from the shipped weights with the same fixed seeds.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from dt_lora import toy
from dt_lora.base import BaseModelNotFound, load_pipeline
from dt_lora.scramble import scramble_grid
from dt_lora.toy import EVAL_SEED, world
from dt_lora.toy.quality import measure


@pytest.fixture(scope="module")
def pipeline():
    return toy.load()


@pytest.fixture(scope="module")
def quality(pipeline):
    return measure(pipeline, toy.load_evaluator(), per_combination=8)


def test_is_a_genuine_sd_pipeline_loadable_offline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(toy.MODEL_DIR, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8


def test_lora_targets_carry_sd_module_names(pipeline):
    names = {name for name, _ in pipeline.unet.named_modules()}
    for attention in ("attn1", "attn2"):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(n.endswith(f"{attention}.{projection}") for n in names), (attention, projection)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names


def test_package_data_is_small_and_safetensors_only():
    files = [p for p in toy.MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 1024 * 1024
    weights = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_tokenizer_keeps_every_toy_word_whole(pipeline):
    for word in world.SHAPES + world.COLOURS:
        assert pipeline.tokenizer.tokenize(word) == [word + "</w>"]
    assert pipeline.tokenizer.model_max_length == 16


def test_text_encoder_embeds_meaning_not_wording(pipeline):
    """Trained, the text encoder puts a concept's paraphrases closer than a neighbouring concept in the
    same words ("a red circle" ~ "a photo of a red circle", not ~ "a red square"). A random one does
    the opposite (measured: 0.81 vs 0.95), which would make every neighbour look like the target."""

    def embed(prompts):
        ids = pipeline.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipeline.text_encoder(ids).last_hidden_state
        return torch.nn.functional.normalize(hidden.flatten(1), dim=-1)

    for shape, colour in [("circle", "red"), ("star", "blue"), ("cross", "yellow")]:
        anchor = embed([world.prompt_for(shape, colour, "a {colour} {shape}")])
        paraphrases = embed([world.prompt_for(shape, colour, t) for t in world.TRAIN_TEMPLATES[1:] + world.HELDOUT_TEMPLATES])
        neighbours = embed([world.prompt_for(s, colour, "a {colour} {shape}") for s in world.SHAPES if s != shape]
                           + [world.prompt_for(shape, c, "a {colour} {shape}") for c in world.COLOURS if c != colour])
        assert (anchor * paraphrases).sum(-1).mean() > (anchor * neighbours).sum(-1).mean() + 0.1, (shape, colour)


def test_generation_is_reproducible(pipeline):
    from dt_lora.base.generate import generate_images

    prompts = ["a red circle", "a blue star", "a green cross"]
    a = generate_images(pipeline, prompts, seed=EVAL_SEED, steps=10, guidance=5.0)
    b = generate_images(pipeline, prompts, seed=EVAL_SEED, steps=10, guidance=5.0, batch_size=2)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    # An image depends on its seed, not on its batch. Not bit for bit: float32 sums over a batch of 3 and
    # one of 2 may round differently, which moves a pixel by one level now and then (1 of 9,216 in CI).
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


@pytest.mark.slow  # the `quality` fixture draws every (shape, colour) pair
@pytest.mark.parametrize("shape", world.SHAPES)
def test_every_shape_is_drawn(quality, shape):
    assert quality.generations.shape_rates[shape] >= 0.90


@pytest.mark.slow  # the `quality` fixture draws every (shape, colour) pair
@pytest.mark.parametrize("colour", world.COLOURS)
def test_every_colour_is_drawn(quality, colour):
    assert quality.generations.colour_rates[colour] >= 0.95


@pytest.mark.slow  # the `quality` fixture draws every (shape, colour) pair
def test_evaluator_calls_scrambled_grids_none_and_clean_renders_shapes(quality):
    assert quality.scrambled_none_rate >= 0.90
    assert quality.clean_none_rate <= 0.02


def test_evaluator_reads_clean_renders():
    images, scenes = world.sample(300, EVAL_SEED + 7)
    shape_idx, colour_idx, _ = toy.load_evaluator().predict(images)
    assert np.mean([world.SHAPES[i] == s.shape for i, s in zip(shape_idx, scenes)]) >= 0.97
    assert np.mean([world.COLOURS[i] == s.colour for i, s in zip(colour_idx, scenes)]) >= 0.97


def test_evaluator_sees_scrambled_renders_of_every_grid_as_none():
    images, _ = world.sample(200, EVAL_SEED + 8)
    for grid in (4, 8):
        scrambled = scramble_grid(images, grid, 3, layout="NHWC", flips=True)
        assert toy.evaluate(scrambled, [""] * len(scrambled)).none_rate >= 0.85, grid


@pytest.mark.slow  # the `quality` fixture draws every (shape, colour) pair
def test_model_card_matches_the_measurement(quality):
    card = json.loads((toy.MODEL_DIR / "quality.json").read_text())
    for kind, rates in (("shape", quality.generations.shape_rates), ("colour", quality.generations.colour_rates)):
        for concept, rate in rates.items():
            assert card[kind][concept] == pytest.approx(rate, abs=0.02), (kind, concept)
    assert (toy.MODEL_DIR / "samples.png").is_file()


def test_evaluate_reports_mismatched_prompts():
    images, _ = world.sample(3, 0)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        toy.evaluate(images, ["a red circle"] * 2)


def test_base_model_errors_name_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelNotFound, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(BaseModelNotFound, match=r"'someone/no-such-model'.*local folder"):
        load_pipeline("someone/no-such-model")
    broken = tmp_path / "broken"
    shutil.copytree(toy.MODEL_DIR, broken, ignore=shutil.ignore_patterns("*.safetensors", "evaluator", "controlnet"))
    with pytest.raises(BaseModelNotFound, match=f"^base model folder {re.escape(str(broken))}: .*no file named .*safetensors"):
        load_pipeline(broken)  # a weight file missing
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(BaseModelNotFound, match=f"^base model folder {re.escape(str(broken))}: .*expected"):
        load_pipeline(broken)  # components missing: diffusers' words, with the folder named


def test_base_model_loads_a_local_diffusers_folder():
    pipe = load_pipeline(str(toy.MODEL_DIR))
    assert pipe.unet.dtype == torch.float32


def test_a_colour_counts_only_on_a_recognisable_shape():
    """The toy scorer's rule (`quality.shows_concept`, which `dt-lora eval`'s ToyScorer uses): tile soup
    of red is no red object, although the evaluator reads its colour as red."""
    from dt_lora.evaluate import ToyScorer
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path
    from dt_lora.toy.quality import shows_concept, target_concept

    evaluator = toy.load_evaluator()
    red, _ = world.sample(60, EVAL_SEED + 9, colour="red")
    soup = scramble_grid(red, 4, 5, layout="NHWC")
    assert shows_concept(evaluator, red, "red").mean() >= 0.9
    assert evaluator.predict(soup)[1].tolist().count(world.COLOURS.index("red")) >= 0.8 * len(soup)
    assert shows_concept(evaluator, soup, "red").mean() <= 0.1
    recipe = load_recipe(recipe_path("toy-red"))
    assert target_concept(recipe.target_prompts) == ToyScorer.concept(recipe) == "red"
    assert (ToyScorer().shows_target(soup, recipe) == shows_concept(evaluator, soup, "red")).all()
    assert target_concept(["a red circle", "a blue square"]) is None
    with pytest.raises(ValueError, match="unknown toy concept 'hexagon'"):
        shows_concept(evaluator, red, "hexagon")


def test_phrasing_families_fill_every_slot_and_label_what_they_name():
    from dt_lora.toy.phrasings import family_prompts

    one = family_prompts({"f": ("a {colour} {shape}", "a {shape}")})
    assert len(one) == 25 + 5 and one[0].text == "a red circle" and one[0].concepts == ("circle", "red")
    assert one[-1].text == "a star" and one[-1].names("star") and not one[-1].names("red")
    two = family_prompts({"f": ("a {colour} {shape} and a {shape2}",)})
    assert len(two) == 5 * 5 * 4  # a second shape is always a different one
    assert two[0].text == "a red circle and a square" and two[0].concepts == ("circle", "red", "square")
    assert all(p.names(p.text.split()[-1]) and len(set(p.concepts)) == 3 for p in two)


def test_run_time_code_imports_neither_training_nor_research_code():
    import subprocess
    import sys

    code = ("import sys, dt_lora.cli, dt_lora.demo, dt_lora.evaluate, dt_lora.toy.quality, dt_lora.toy.controlnet; "
            "print(sorted(m for m in sys.modules if m.startswith(('worlds.toy.build', 'worlds.toy.training', 'research'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    build = subprocess.run([sys.executable, "-m", "worlds.toy.build", "--help"], capture_output=True, text=True)
    assert build.returncode == 0 and "--stages" in build.stdout


def test_git_and_the_wheel_see_every_package_file():
    """maturin builds the wheel from what .gitignore lets through: an ignored module (a package folder
    named like a build output, say) would be missing from git and from every installed copy."""
    import shutil
    import subprocess
    from pathlib import Path

    # this checkout's package folder (an installed copy may sit in another git repository, pyenv's say)
    package = Path(__file__).resolve().parents[2] / "python" / "dt_lora"
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=package, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    sources = [str(path) for path in package.rglob("*") if path.suffix in (".py", ".json")
               and "__pycache__" not in path.parts]
    assert len(sources) > 40
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=package, capture_output=True, text=True)
    assert ignored.returncode == 1, ignored.stdout + ignored.stderr  # 1: none of them is ignored


# ---- the toy SDXL: SDXL's architecture and conditioning on the same world, scored by the same evaluator


@pytest.fixture(scope="module")
def sdxl_quality():
    return measure(toy.load(model_dir=toy.SDXL_MODEL_DIR), toy.load_evaluator(), per_combination=8)


def test_toy_sdxl_is_a_genuine_sdxl_pipeline_loadable_offline():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dt_lora.base.family import family

    pipe = StableDiffusionXLPipeline.from_pretrained(toy.SDXL_MODEL_DIR, local_files_only=True)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert family(pipe) == "sdxl" and pipe.unet.config.down_block_types[0] == "DownBlock2D"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt
    assert type(load_pipeline("toy-sdxl")).__name__ == "StableDiffusionXLPipeline"
    files = [p for p in toy.SDXL_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 16 * 1024 * 1024
    assert all(p.suffix == ".safetensors" for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".safetensors"))


@pytest.mark.slow  # draws every (shape, colour) pair
def test_toy_sdxl_draws_every_shape_and_colour_as_its_card_says(sdxl_quality):
    card = json.loads((toy.SDXL_MODEL_DIR / "quality.json").read_text())
    for kind, rates in (("shape", sdxl_quality.generations.shape_rates),
                        ("colour", sdxl_quality.generations.colour_rates)):
        for concept, rate in rates.items():
            assert rate >= 0.90, (kind, concept)
            assert card[kind][concept] == pytest.approx(rate, abs=0.02), (kind, concept)
