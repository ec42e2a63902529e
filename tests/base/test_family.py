"""SDXL and SD 2.x bases: loading, prompt conditioning, training targets, adapters, and family errors.

The pipelines are helpers/family_tiny.py's: the real block layouts at toy width, random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.family_tiny import build_sd2, build_sdxl
from helpers.lora import SDXL_SHIELDS, demo_folder

from dt_lora.adapters import AdapterError, load_adapters, read_adapter, unload_adapters
from dt_lora.base import family as fam
from dt_lora.base import load_pipeline
from dt_lora.errors import UserError
from dt_lora.recipe import load_recipe
from dt_lora.shield.train import train_adapter

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
TINY = {"target.images": "4", "anchors.images": "4", "train.steps": "3", "train.batch_size": "2",
        "sampling.steps": "2", "lora.rank": "2", "lora.alpha": "2"}


@pytest.fixture(scope="module")
def sdxl():
    return build_sdxl()


@pytest.fixture(scope="module")
def sd2():
    return build_sd2()


def tiny_circle_shield(pipeline, folder: Path) -> Path:
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", TINY)
    return train_adapter(recipe, folder / "circle.safetensors", cache_dir=folder / "cache", pipeline=pipeline,
                         progress=False).adapter


@pytest.fixture(scope="module")
def sd2_shield(sd2, tmp_path_factory):
    """Trained with the velocity target: SD 2.1's scheduler predicts v."""
    return tiny_circle_shield(sd2, tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module")
def sdxl_shield(sdxl, tmp_path_factory):
    return tiny_circle_shield(sdxl, tmp_path_factory.mktemp("sdxl"))


def test_families_are_told_apart_by_the_unet(sdxl, sd2):
    from dt_lora import toy

    assert (fam.family(sdxl), fam.family(sd2), fam.family(toy.load())) == ("sdxl", "sd2", "sd1")


def test_sdxl_prompt_inputs_are_the_pipelines_own(sdxl):
    prompts = ["a red circle", "a blue square"]
    ours = fam.encode_prompts(sdxl, prompts)
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.embeds.shape[-1] == sdxl.unet.config.cross_attention_dim  # both encoders' widths
    assert ours.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    empty = fam.unconditional_prompt(sdxl)  # SDXL base zeroes the empty prompt for guidance
    assert not empty.embeds.any() and not empty.pooled.any()


def test_a_prompt_for_one_encoder_is_what_the_pipeline_gives_prompt_and_prompt_2(sdxl):
    prompts = ["a red circle", "a blue square"]
    first, second = (fam.encode_for_one_encoder(sdxl, prompts, encoder) for encoder in (0, 1))
    with torch.no_grad():
        for ours, (prompt, prompt_2) in ((first, (prompts, [""] * 2)), (second, ([""] * 2, prompts))):
            embeds, _, pooled, _ = sdxl.encode_prompt(prompt, prompt_2=prompt_2, device="cpu",
                                                      do_classifier_free_guidance=False)
            assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)


def test_split_encoder_training_on_sdxl_and_its_note_elsewhere(sdxl, sd2, tmp_path, capsys):
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {**TINY, "train.split_encoders": "true", "train.steps": "1"})
    path = train_adapter(recipe, tmp_path / "xl.safetensors", cache_dir=tmp_path / "cache", pipeline=sdxl,
                         progress=False).adapter
    assert read_adapter(path).concepts[0]["train"]["split_encoders"] is True
    assert "split_encoders" not in capsys.readouterr().err
    train_adapter(recipe, tmp_path / "sd2.safetensors", cache_dir=tmp_path / "cache", pipeline=sd2, progress=False)
    assert "train.split_encoders applies to SDXL's two text encoders; this SD 2.x base has one" in capsys.readouterr().err


def test_velocity_target_where_the_scheduler_predicts_v(sd2):
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alphas = torch.tensor([0.9, 0.1]).view(-1, 1, 1, 1)
    expected = sd2.scheduler.get_velocity(latents, noise, torch.tensor([0, 0]))  # shape only: its own t
    target = fam.training_target(sd2.scheduler, latents, noise, alphas)
    assert target.shape == expected.shape
    torch.testing.assert_close(target, alphas.sqrt() * noise - (1 - alphas).sqrt() * latents)
    t = torch.tensor([100, 900])  # diffusers' own velocity at the same timesteps
    a = sd2.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(fam.training_target(sd2.scheduler, latents, noise, a),
                               sd2.scheduler.get_velocity(latents, noise, t))

    from types import SimpleNamespace

    from dt_lora.shield.losses import StepContext
    ctx = SimpleNamespace(scheduler=sd2.scheduler, alphas_cumprod=sd2.scheduler.alphas_cumprod, num_timesteps=1000,
                          device=torch.device("cpu"))
    noisy, target, t = StepContext.add_noise(ctx, latents, torch.Generator().manual_seed(3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))  # the same draw
    torch.testing.assert_close(target, sd2.scheduler.get_velocity(latents, noise, t))


@pytest.mark.parametrize("kind", ["sdxl", "sd2"])
def test_folders_load_as_their_family(kind, tmp_path):
    pipeline = build_sdxl() if kind == "sdxl" else build_sd2()
    pipeline.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(tmp_path)
    assert type(loaded).__name__ == type(pipeline).__name__ and fam.family(loaded) == kind
    assert loaded.scheduler.config.prediction_type == pipeline.scheduler.config.prediction_type


def test_another_pipeline_class_is_a_one_line_error(tmp_path, sdxl):
    sdxl.save_pretrained(tmp_path, safe_serialization=True)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="names 'FluxPipeline'; dt-lora shields Stable Diffusion"):
        load_pipeline(tmp_path)


def test_sdxl_shield_trains_records_its_family_and_stacks(sdxl, sdxl_shield):
    assert read_adapter(sdxl_shield).concepts[0]["family"] == "sdxl"
    inputs = fam.encode_prompts(sdxl, ["a red circle"]).unet_inputs()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        plain = sdxl.unet(x, t, **inputs).sample
        load_adapters(sdxl, [sdxl_shield, sdxl_shield])  # two stacked
        try:
            shielded = sdxl.unet(x, t, **inputs).sample
            image = sdxl(["a red circle"], num_inference_steps=2, output_type="np").images
        finally:
            unload_adapters(sdxl)
        again = sdxl.unet(x, t, **inputs).sample
    assert (shielded - plain).abs().max() > 0 and torch.equal(again, plain)
    assert image.shape == (1, 64, 64, 3)


def test_sd2_v_prediction_shield_trains(sd2_shield):
    assert read_adapter(sd2_shield).concepts[0]["family"] == "sd2"


def assert_draws_as_the_stack(pipeline, shield, kohya):
    """diffusers' own kohya converter (`load_lora_weights`) reads `kohya` onto the UNet with the outputs of
    the shield stacked."""
    inputs = fam.encode_prompts(pipeline, ["a red circle"]).unet_inputs()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300])
    with torch.no_grad():
        plain, outputs = pipeline.unet(x, t, **inputs).sample, []
        for load in (lambda: load_adapters(pipeline, [shield]), lambda: pipeline.load_lora_weights(str(kohya))):
            load()
            try:
                outputs.append(pipeline.unet(x, t, **inputs).sample)
            finally:
                unload_adapters(pipeline)
    stacked, exported = outputs
    assert (stacked - plain).abs().max() > 0  # the shield changes the output
    torch.testing.assert_close(exported, stacked, rtol=1e-5, atol=1e-6)


def test_sd2_shield_exports_for_kohya_and_bakes(sd2, sd2_shield, tmp_path):
    """SD 2.x keeps diffusers' module names in kohya's layout, as sd-scripts names them."""
    from dt_lora.adapters.bake import bake, fuse_adapters
    from dt_lora.adapters.export import write_kohya

    kohya = write_kohya(tmp_path / "kohya.safetensors", read_adapter(sd2_shield))
    assert_draws_as_the_stack(sd2, sd2_shield, kohya)
    base = tmp_path / "base"
    sd2.save_pretrained(base, safe_serialization=True)
    baked = load_pipeline(bake(str(base), [sd2_shield], tmp_path / "baked", dtype=torch.float32).out)
    assert baked.scheduler.config.prediction_type == "v_prediction"
    fuse_adapters(expected := load_pipeline(base), [sd2_shield])
    assert all(torch.equal(baked.unet.state_dict()[k], v) for k, v in expected.unet.state_dict().items())


def test_a_shield_of_another_family_is_refused_naming_both(sdxl, sdxl_shield, tmp_path):
    from helpers.sd15_tiny import build

    from dt_lora.adapters import write_adapter

    with pytest.raises(AdapterError, match=r"circle.safetensors: toy-circle is an SDXL shield and this base is SD 1\.x"):
        load_adapters(build(), [sdxl_shield])
    labelled_sd1 = read_adapter(sdxl_shield)  # the reverse: a shield that says SD 1.x, on the SDXL base
    labelled_sd1.concepts[0]["family"] = "sd1"
    path = write_adapter(tmp_path / "sd1.safetensors", labelled_sd1)
    with pytest.raises(AdapterError, match=r"sd1.safetensors: toy-circle is an SD 1\.x shield and this base is SDXL"):
        load_adapters(sdxl, [path])


def test_kohya_export_of_an_sdxl_shield_uses_sgm_names_and_draws_as_the_stack(sdxl, sdxl_shield, tmp_path):
    from safetensors.torch import load_file

    from dt_lora.adapters.export import write_kohya

    kohya = write_kohya(tmp_path / "kohya.safetensors", read_adapter(sdxl_shield))
    names = {key.split(".")[0] for key in load_file(kohya)}
    # SDXL's attention blocks: down 1 (2 layers) and 2, mid, up 0 and 1 (3 layers each)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k" in names
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v" in names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)

    assert_draws_as_the_stack(sdxl, sdxl_shield, kohya)


def test_an_sdxl_guard_covers_both_encoders_and_travels_with_its_shield(sdxl, sdxl_shield, tmp_path):
    """An SDXL shield's guard is a LoRA on each text encoder (`text_encoder.*`, `text_encoder_2.*`): diffusers
    stacks both, merging keeps both, baking fuses both, and kohya's SDXL layout names them te1 and te2."""
    from safetensors.torch import load_file

    from dt_lora.adapters import write_adapter
    from dt_lora.adapters.bake import bake
    from dt_lora.adapters.export import write_kohya
    from dt_lora.adapters.merge import merge_adapters
    from dt_lora.shield import guard

    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {**TINY, "guard.rounds": "0", "guard.steps": "4"})
    adapter = read_adapter(sdxl_shield)
    adapter.text_encoders = guard.train_guard(sdxl, recipe, log=lambda line: None)
    assert sorted(adapter.text_encoders) == ["text_encoder", "text_encoder_2"]
    shield = write_adapter(tmp_path / "guarded.safetensors", adapter)

    def prompt_inputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = fam.encode_prompts(pipeline, ["a red circle", "x y a blue square"])
        return inputs.embeds, inputs.pooled

    def inputs_with(load) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompt_inputs` with the LoRA that `load` puts on the base, which is taken off again after."""
        load()
        try:
            return prompt_inputs(sdxl)
        finally:
            unload_adapters(sdxl)

    base, stacked = prompt_inputs(sdxl), inputs_with(lambda: load_adapters(sdxl, [shield]))
    width = sdxl.text_encoder.config.hidden_size  # CLIP-L's half of the states, then OpenCLIP-G's
    changes = (stacked[0] - base[0])[..., :width], (stacked[0] - base[0])[..., width:], stacked[1] - base[1]
    assert all(change.abs().max() > 0 for change in changes)  # both encoders' states move, and the pooled one
    assert all(torch.equal(a, b) for a, b in zip(prompt_inputs(sdxl), base))  # unloaded: the base again

    merged = write_adapter(tmp_path / "merged.safetensors", merge_adapters([shield, shield], [0.5, 0.5]).adapter)
    assert sorted(read_adapter(merged).text_encoders) == ["text_encoder", "text_encoder_2"]
    kohya = write_kohya(tmp_path / "kohya.safetensors", read_adapter(shield))
    prefixes = {key.split("_text_model_")[0] for key in load_file(kohya) if "_text_model_" in key}
    assert prefixes == {"lora_te1", "lora_te2"}  # sd-scripts' names for CLIP-L and OpenCLIP-G
    sdxl_base = tmp_path / "base"
    sdxl.save_pretrained(sdxl_base, safe_serialization=True)
    baked = load_pipeline(bake(str(sdxl_base), [shield], tmp_path / "baked", dtype=torch.float32).out)
    from_merged = inputs_with(lambda: load_adapters(sdxl, [merged]))
    from_kohya = inputs_with(lambda: sdxl.load_lora_weights(str(kohya)))  # diffusers reads kohya's SDXL layout
    for other in (from_merged, from_kohya, prompt_inputs(baked)):
        for got, expected in zip(other, stacked):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_shields_of_two_families_are_not_merged(sdxl_shield, tmp_path):
    from dt_lora.adapters.merge import merge_adapters

    sd1 = read_adapter(sdxl_shield)
    for concept in sd1.concepts:
        concept["family"] = "sd1"
    with pytest.raises(AdapterError, match="different model families .*SDXL"):
        merge_adapters([sdxl_shield, sd1], force=True)


class NoConcept:
    """A scorer for random models: no image shows the concept, every anchor is right."""

    name = "none"

    def shows_target(self, images, recipe):
        import numpy as np

        return np.zeros(len(images), dtype=bool)

    def preservation(self, images, prompts):
        return {}

    def features(self, images):
        import numpy as np

        return np.ones((len(images), 1), dtype=np.float32)


def test_attack_prompts_with_free_tokens_encode_as_their_text_through_both_encoders(sdxl):
    """The attack's hook on the token embeddings, and its ids for the second tokenizer (which pads with
    "!" where CLIP-L pads with its end token), give exactly the pipeline's encoding of the prompt's text."""
    from dt_lora.search import AttackPrompt, Objective, Victim, allowed_tokens

    objective = Objective(Victim("base", sdxl), torch.zeros(1, 4, 8, 8), 5.0, 2)
    prompt = AttackPrompt(sdxl.tokenizer, "a red circle", 2)
    free = allowed_tokens(sdxl.tokenizer, ["circle"])[torch.tensor([3, 40])]
    ids = prompt.ids(free[None])
    as_text = fam.encode_prompts(sdxl, [prompt.text(free.tolist())])
    with torch.no_grad():
        plain = objective.encode(ids)
        hooked = objective.encode(ids, prompt.slots, [e[free][None] for e in objective.input_embeddings])
    for name, tensor in as_text.tensors().items():
        torch.testing.assert_close(plain.tensors()[name], tensor)
        torch.testing.assert_close(hooked.tensors()[name], tensor)
    one_hot = torch.nn.functional.one_hot(free, len(sdxl.tokenizer)).float().requires_grad_(True)
    moved = objective.encode(ids, prompt.slots, [(one_hot @ e)[None] for e in objective.input_embeddings])
    gradients = torch.autograd.grad(moved.pooled.sum(), one_hot)  # the pooled path: the second encoder only
    assert gradients[0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["sdxl", "sd2"])
def test_both_attacks_run_on_either_family(kind, request, tmp_path):
    """SDXL: through both text encoders; SD 2.x: against the velocity its scheduler predicts."""
    from dt_lora.evaluate.attack import AttackSettings, attack_shields

    pipeline, shield = request.getfixturevalue(kind), request.getfixturevalue(f"{kind}_shield")
    recipe = load_recipe(ADAPTERS / "toy-circle.toml", TINY)
    settings = AttackSettings(prompts=1, free_tokens=2, steps=3, candidates=4, top_k=4, soft_steps=3, samples=2,
                              concept_images=2, seeds=1, objective="denoise")
    result = attack_shields(pipeline, [recipe], tmp_path, adapters=[shield], scorer=NoConcept(), settings=settings,
                            steps=2, progress=False, write=False)
    rows = result.rates[recipe.name]["shielded"]
    (discrete,) = rows["discrete attack"]["found"]
    (soft,) = rows["soft attack"]["found"]
    assert discrete["searched"] and discrete["found"].endswith(discrete["source"])
    assert discrete["loss_after"] <= discrete["loss_before"] and soft["loss_after"] <= soft["loss_before"]
    assert soft["found"].startswith("[soft]") and rows["discrete attack"]["prompt_rate"] == 0


@pytest.mark.parametrize("format", ["diffusers", "single-file"])
def test_an_sdxl_shield_bakes_into_a_model_that_diffusers_and_controlnet_load(sdxl, sdxl_shield, format, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    from dt_lora.adapters.bake import bake, fuse_adapters

    base = tmp_path / "base"
    sdxl.save_pretrained(base, safe_serialization=True)
    out = tmp_path / ("baked" if format == "diffusers" else "baked.safetensors")
    bake(str(base), [sdxl_shield], out, format=format, dtype=torch.float32)
    if format == "diffusers":
        baked = load_pipeline(out)
    else:
        baked = StableDiffusionXLPipeline.from_single_file(str(out), config=str(base), local_files_only=True,
                                                          dtype=torch.float32)
    expected = load_pipeline(base)
    fuse_adapters(expected, [sdxl_shield])
    for name, tensor in expected.unet.state_dict().items():
        assert torch.equal(baked.unet.state_dict()[name], tensor), name
    controlnet = ControlNetModel.from_unet(baked.unet)  # SDXL ControlNets are made from the UNet as well
    assert controlnet.config.addition_embed_type == "text_time"


def test_an_sd15_recipe_on_an_sdxl_base_warns_about_its_resolution(sdxl, tmp_path, capsys):
    recipe = load_recipe(ADAPTERS / "sd15-style-vangogh.toml", {**TINY, "train.steps": "1"})
    assert recipe.resolution == 512
    train_adapter(recipe, tmp_path / "vangogh.safetensors", cache_dir=tmp_path / "cache", pipeline=sdxl, progress=False)
    warning = capsys.readouterr().err
    assert "train.mixed_precision = 'fp16' is for CUDA; training in float32 on cpu" in warning  # not a torch error
    assert ("warning: recipe 'sd15-style-vangogh' was written for 512 px images (resolution), and this SDXL base "
            "draws 64 px: scramble.grid 8 cuts 8 px tiles instead of 64 px") in warning
    assert load_recipe(ADAPTERS / "toy-circle.toml").resolution_warning(32, "SD 1.x") is None  # not stated
    assert load_recipe(ADAPTERS / "sd15-style-vangogh.toml").resolution_warning(512, "SD 1.x") is None


@pytest.mark.slow  # bakes and evaluates two recipes on the toy SDXL: about 2 minutes on 2 cores
def test_the_demo_on_the_toy_sdxl_shields_both_concepts_and_keeps_the_rest(tmp_path, capsys):
    """The whole job on an SDXL-architecture model that really draws the toy world: the recipes' shields
    (unchanged recipes, trained on the toy SDXL: tests/data/sdxl-shields, whose records test_shipped_shields
    checks), merged, baked into an SDXL folder, evaluated. The SD toy's bars hold."""
    from dt_lora.cli import main

    out = demo_folder(tmp_path / "demo", SDXL_SHIELDS.glob("toy-*.safetensors"))
    assert main(["demo", "--base", "toy-sdxl", "-o", str(out), "-q"]) == 0
    assert "shields reused" in capsys.readouterr().out
    report = json.loads((out / "report" / "report.json").read_text())
    for name in ("toy-circle", "toy-red"):
        shield = report["shields"][name]
        assert shield["target"]["base"] >= 0.9 and shield["target"]["shielded"] <= 0.10
        assert shield["paraphrases"]["shielded"] <= 0.20
        base, shielded = shield["preservation"]["base"], shield["preservation"]["shielded"]
        for concept, rate in shielded.items():
            assert rate >= 0.9 * base[concept], (name, concept, rate)
    assert json.loads((out / "toy-shielded" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLPipeline"
    assert {c["family"] for c in read_adapter(out / "shields" / "toy-circle+red.safetensors").concepts} == {"sdxl"}


def test_a_pooled_path_shield_is_text_local_in_the_pooled_embedding(sdxl, tmp_path):
    """SDXL's added embedding as a LoRA target: lora_A holds directions of the pooled embedding only (zero on
    the size ids), the adapter stacks through diffusers, and kohya's name is the SGM one (label_emb.0.0)."""
    from dt_lora.adapters.export import to_kohya

    recipe = load_recipe(ADAPTERS / "toy-circle.toml", {
        **TINY, "lora.targets": "attn2.to_k,attn2.to_v,add_embedding.linear_1", "train.split_encoders": "true"})
    path = train_adapter(recipe, tmp_path / "pooled.safetensors", cache_dir=tmp_path / "cache", pipeline=sdxl,
                         progress=False).adapter
    adapter = read_adapter(path)
    lora_a = adapter.weights["add_embedding.linear_1.lora_A.weight"]
    pooled = sdxl.text_encoder_2.config.projection_dim
    assert lora_a.shape == (2, sdxl.unet.add_embedding.linear_1.in_features)
    assert lora_a[:, :pooled].abs().max() > 0 and not lora_a[:, pooled:].any()
    assert "lora_unet_label_emb_0_0.lora_down.weight" in to_kohya(adapter)
    inputs = fam.encode_prompts(sdxl, ["a red circle"]).unet_inputs()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([400])
    with torch.no_grad():
        before = sdxl.unet(x, t, **inputs).sample
        load_adapters(sdxl, [path])
        try:
            assert isinstance(sdxl.unet.add_embedding.linear_1.lora_A["shield0"], torch.nn.Linear)
            after = sdxl.unet(x, t, **inputs).sample
        finally:
            unload_adapters(sdxl)
    assert (after - before).abs().max() > 0
