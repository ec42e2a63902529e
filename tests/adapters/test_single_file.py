"""The single-file export against diffusers' own converters for the opposite direction.

If diffusers' `from_single_file` (and the `convert_ldm_*` functions under it) turns our file back into
exactly the pipeline's weights, every name is the one the original SD layout uses: those converters
are what diffusers loads real SD 1.5, SD 2.x and SDXL checkpoints with.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import family_tiny, sd15_tiny

from dt_lora import toy
from dt_lora.adapters.single_file import (
    COMPONENTS,
    OPEN_CLIP,
    component_to_ldm,
    key_table,
    to_single_file,
    write_single_file,
)
from dt_lora.base.family import family

CONFIGS = Path(__file__).parents[2] / "python/dt_lora/configs"
SD15_UNET_CONFIG = CONFIGS / "sd15_unet.json"
DRAW_STEPS = 2  # sampler steps of the pictures the loaded single files draw

# SD 1.5's tensor counts per component. Derived in `test_full_size_sd15_has_the_same_keys`: diffusers'
# own classes built at SD 1.5's full size (python/dt_lora/configs/sd15_unet.json, whose UNet has SD 1.5's
# published 859,520,964 parameters; the v1-5 VAE config; CLIP ViT-L/14's text tower) give 686 / 248 / 196
# tensors, and the converter below turns them back without loss. v1-5-pruned-emaonly holds the same 686
# UNet and 248 VAE tensors; its text encoder has 197, the 196 weights plus the `position_ids` buffer that
# transformers (since 4.31) no longer saves and that the single file carries as the original does.
SD15_COUNTS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.": 197}

SD15_NAMES = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.time_embed.2.bias",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # what diffusers detects SD 1.x by
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.1.conv2.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.up.3.block.0.norm1.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.2.conv1.weight",
    "first_stage_model.decoder.mid.block_2.norm2.bias",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight",
    "first_stage_model.post_quant_conv.bias",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.bias",
]


@pytest.fixture(scope="module")
def sd15():
    return sd15_tiny.build()


@pytest.fixture(scope="module")
def sd15_folder(sd15, tmp_path_factory):
    return sd15_tiny.save(sd15, tmp_path_factory.mktemp("sd15_tiny"))


@pytest.fixture(scope="module")
def toy_pipeline():
    return toy.load()


@pytest.fixture(scope="module")
def sdxl():
    return family_tiny.build_sdxl()


@pytest.fixture(scope="module")
def sd2():
    return family_tiny.build_sd2()


@pytest.fixture(scope="module")
def pipelines(sd15, sd15_folder, toy_pipeline, sdxl, sd2, tmp_path_factory):
    """name → (pipeline, its diffusers folder, which from_single_file reads the configs from)."""
    folders = {}
    for name, pipeline in (("sdxl", sdxl), ("sd2", sd2)):
        folders[name] = tmp_path_factory.mktemp(name)
        pipeline.save_pretrained(folders[name], safe_serialization=True)
    return {"sd15": (sd15, sd15_folder), "toy": (toy_pipeline, toy.MODEL_DIR), "sdxl": (sdxl, folders["sdxl"]),
            "sd2": (sd2, folders["sd2"])}


def components(pipeline) -> list[str]:
    return list(COMPONENTS[family(pipeline)])


def assert_same_tensors(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), (
        f"{what}: missing {sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]}")
    unequal = [key for key in want if not torch.equal(got[key], want[key])]
    assert not unequal, f"{what}: {len(unequal)} tensors differ, e.g. {unequal[:5]}"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd2"])
def test_tiny_tensors_are_all_different(pipelines, name):
    """Otherwise an exact comparison could not see two same-shaped weights swapped."""
    pipeline = pipelines[name][0]
    tensors = [t for c in components(pipeline) for t in getattr(pipeline, c).state_dict().values()]
    assert len({(tuple(t.shape), *t.flatten()[:4].tolist()) for t in tensors}) == len(tensors)


@pytest.mark.parametrize("name", ["sd15", "toy", "sdxl", "sd2"])
def test_from_single_file_restores_every_weight(pipelines, name, tmp_path):
    pipeline, folder = pipelines[name]
    path = write_single_file(pipeline, tmp_path / "model.safetensors")
    loaded = type(pipeline).from_single_file(str(path), config=str(folder), local_files_only=True, dtype=torch.float32)
    for component in components(pipeline):
        state = getattr(loaded, component).state_dict()
        assert not [k for k, t in state.items() if t.is_meta], f"{component}: weights left unloaded"
        assert_same_tensors(state, getattr(pipeline, component).state_dict(), f"{name} {component}")
    assert_draws(loaded, name)


def assert_draws(pipeline, what: str):
    """A few sampler steps give a whole picture: finite, not one flat colour."""
    import numpy as np

    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", num_inference_steps=DRAW_STEPS, guidance_scale=toy.DEFAULT_GUIDANCE,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    assert image.shape == (1, side, side, 3), f"{what}: a {image.shape} picture"
    assert np.isfinite(image).all() and image.std() > 0.01, f"{what}: no picture ({image.min()} … {image.max()})"


def converted_back(pipeline, ours: dict) -> dict[str, dict]:
    """diffusers' converters applied to our single file: component → diffusers state dict."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    back = {"unet": convert_ldm_unet_checkpoint(ours, dict(pipeline.unet.config)),
            "vae": convert_ldm_vae_checkpoint(ours, dict(pipeline.vae.config))}
    for component, prefix in COMPONENTS[family(pipeline)].items():
        model = getattr(pipeline, component)
        if not component.startswith("text_encoder"):
            continue
        if (family(pipeline), component) in OPEN_CLIP:
            state = convert_open_clip_checkpoint(model, ours, prefix=prefix)
        else:
            state = convert_ldm_clip_checkpoint({k: v for k, v in ours.items() if k.startswith(prefix)})
            positions = state.pop("text_model.embeddings.position_ids")  # a buffer transformers does not save
            assert torch.equal(positions, torch.arange(model.config.max_position_embeddings)[None])
        if not hasattr(model, "text_model"):  # CLIPTextModel has no `text_model.` level since transformers 5.6
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        back[component] = state
    return back


@pytest.mark.parametrize("name", ["sd15", "toy", "sdxl", "sd2"])
def test_diffusers_converters_invert_the_export(pipelines, name):
    pipeline = pipelines[name][0]
    ours = to_single_file(pipeline)
    back = converted_back(pipeline, ours)
    again = {}
    for component in components(pipeline):
        model = getattr(pipeline, component)
        assert_same_tensors(back[component], model.state_dict(), f"{name} {component} via diffusers")
        again.update(component_to_ldm(component, model.config, back[component], family=family(pipeline)))
    assert_same_tensors(again, ours, f"{name} exported again")


def test_sd15_layout_has_sd15_names_and_counts(sd15):
    tensors = to_single_file(sd15)
    missing = [name for name in SD15_NAMES if name not in tensors]
    assert not missing
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    counts = {prefix: sum(k.startswith(prefix) for k in tensors) for prefix in SD15_COUNTS}
    assert counts == SD15_COUNTS
    assert len(tensors) == sum(SD15_COUNTS.values())
    assert all(t.is_contiguous() and t.dtype == (torch.int64 if k.endswith("position_ids") else torch.float32)
               for k, t in tensors.items())


def test_full_size_sd15_has_the_same_keys(sd15):
    """SD 1.5 at full size, on the meta device (no memory): the tiny fixture's names are SD 1.5's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads(SD15_UNET_CONFIG.read_text())
    with torch.device("meta"):
        full = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(config),
            vae=AutoencoderKL(  # stable-diffusion-v1-5/vae/config.json
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512),
            text_encoder=CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768)),
        )
    assert sum(p.numel() for p in full.unet.parameters()) == 859_520_964  # SD 1.5's published UNet size
    rows = key_table(full)
    assert [ldm for _, ldm in rows] == [ldm for _, ldm in key_table(sd15)]
    ours = to_single_file(full)
    assert sorted(convert_ldm_unet_checkpoint(ours, dict(full.unet.config))) == sorted(full.unet.state_dict())
    assert sorted(convert_ldm_vae_checkpoint(ours, dict(full.vae.config))) == sorted(full.vae.state_dict())


def test_key_table_lists_every_tensor_once(sd15):
    rows = key_table(sd15)
    assert len(rows) == len({d for d, _ in rows}) == len({ldm for _, ldm in rows})
    assert ("unet.up_blocks.1.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight") in rows
    assert ("vae.decoder.up_blocks.0.resnets.2.norm1.weight",
            "first_stage_model.decoder.up.3.block.2.norm1.weight") in rows
    assert ("text_encoder.encoder.layers.0.self_attn.out_proj.bias",
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.bias") in rows


def test_toy_layout(toy_pipeline):
    """The toy's 2 × CrossAttn blocks of 1 layer and 3-block VAE number like SD's do."""
    tensors = to_single_file(toy_pipeline)
    for name in [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",  # down 0, layer 0
        "model.diffusion_model.input_blocks.2.0.op.weight",  # down 0's downsampler: (0+1)*(1+1)
        "model.diffusion_model.input_blocks.3.1.norm.weight",  # down 1, layer 0
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # up 0's upsampler after its attention
        "model.diffusion_model.output_blocks.3.1.proj_out.bias",  # up 1, layer 1
        "first_stage_model.decoder.up.2.block.1.conv2.weight",  # decoder up_blocks.0 is level 2
        "first_stage_model.decoder.up.1.upsample.conv.weight",
    ]:
        assert name in tensors, name
    assert not any(".output_blocks.4." in k or ".input_blocks.5." in k or ".up.3." in k for k in tensors)


@pytest.mark.parametrize("component, key, hint", [
    ("unet", "down_blocks.0.resnets.0.norm3.weight", None),
    ("unet", "class_embedding.linear_1.weight", None),
    ("unet", "down_blocks.0.resnets.0.norm1.running_mean", None),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight", "LoRA"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight", "LoRA"),
    ("vae", "encoder.mid_block.attentions.1.to_q.weight", None),
    ("text_encoder", "text_projection.weight", None),
])
def test_an_unmappable_key_raises_naming_it(sd15, component, key, hint):
    config = getattr(sd15, component).config
    with pytest.raises(ValueError, match="no name in the single-file layout") as error:
        component_to_ldm(component, config, {key: torch.zeros(2, 2)})
    assert repr(key) in str(error.value)
    if hint:
        assert hint in str(error.value)


def test_to_single_file_refuses_a_pipeline_with_an_unknown_tensor(sd15):
    extra = {**sd15.unet.state_dict(), "add_embedding.linear_1.weight": torch.zeros(2, 2)}
    pipeline = SimpleNamespace(unet=SimpleNamespace(config=sd15.unet.config, state_dict=lambda: extra),
                               vae=sd15.vae, text_encoder=sd15.text_encoder)
    with pytest.raises(ValueError, match="'add_embedding.linear_1.weight'"):
        to_single_file(pipeline)


def test_unsupported_block_types_raise(sd15):
    config = {**sd15.unet.config, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        component_to_ldm("unet", config, {})


def test_write_single_file_dtype_metadata_and_atomicity(toy_pipeline, tmp_path):
    from safetensors import safe_open

    path = write_single_file(toy_pipeline, tmp_path / "toy.safetensors", dtype=torch.float16,
                             metadata={"dt_lora": '{"concepts": []}'})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"dt_lora": '{"concepts": []}'}
        assert f.get_tensor("first_stage_model.decoder.mid.attn_1.k.weight").shape == (64, 64, 1, 1)
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names if not k.endswith("position_ids")} == {"F16"}
        assert f.get_slice("cond_stage_model.transformer.text_model.embeddings.position_ids").get_dtype() == "I64"
        assert len(names) == len(key_table(toy_pipeline)) + 1  # and the position_ids buffer
    assert [p.name for p in tmp_path.iterdir()] == ["toy.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match="str to str"):
        write_single_file(toy_pipeline, tmp_path / "bad.safetensors", metadata={"steps": 3})
    assert not (tmp_path / "bad.safetensors").exists()


def full_size(kind: str) -> SimpleNamespace:
    """SDXL base 1.0 or SD 2.1 at full size on the meta device, from the configs in python/dt_lora/configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(name: str, model_class):
        config = json.loads((CONFIGS / name).read_text())
        return model_class(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(json.loads((CONFIGS / f"{kind}_unet.json").read_text())),
                  "vae": AutoencoderKL.from_config(json.loads((CONFIGS / "sd15_vae.json").read_text()))}
        if kind == "sdxl":
            models["text_encoder"] = text("sd15_text_encoder.json", CLIPTextModel)  # CLIP ViT-L/14, as SD 1.5's
            models["text_encoder_2"] = text("sdxl_text_encoder_2.json", CLIPTextModelWithProjection)
        else:
            models["text_encoder"] = text("sd21_text_encoder.json", CLIPTextModel)
    return SimpleNamespace(**models)


# Tensor counts of the original checkpoints per component (sd_xl_base_1.0.safetensors,
# v2-1_768-ema-pruned.safetensors): the UNets have diffusers' 1680 / 686 tensors one for one; CLIP-L has
# its 196 weights and `position_ids`; OpenCLIP has 12 tensors a residual block (ln_1, fused in_proj,
# out_proj, ln_2, c_fc, c_proj: weight and bias each) for 32 (bigG) or 24 (ViT-H) blocks, plus
# token_embedding, positional_embedding, ln_final (2), text_projection and logit_scale.
ORIGINAL_COUNTS = {
    "sdxl": {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.transformer.": 197,
             "conditioner.embedders.1.model.": 32 * 12 + 6},
    "sd21": {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.model.": 24 * 12 + 6},
}
ORIGINAL_SHAPES = {
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),  # linear
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias": (1280,),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (3840,),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),  # diffusers detects SDXL by it
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    },
    "sd21": {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),  # detects 2.x
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
}


@pytest.mark.parametrize("kind", ["sdxl", "sd21"])
def test_full_size_sdxl_and_sd21_have_the_original_keys(kind):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    full = full_size(kind)
    published = {"sdxl": 2_567_463_684, "sd21": 865_910_724}[kind]  # the UNets' published parameter counts
    assert sum(p.numel() for p in full.unet.parameters()) == published
    tensors = to_single_file(full)
    counts = {prefix: sum(k.startswith(prefix) for k in tensors) for prefix in ORIGINAL_COUNTS[kind]}
    assert counts == ORIGINAL_COUNTS[kind] and len(tensors) == sum(counts.values())
    assert {k: tuple(tensors[k].shape) for k in ORIGINAL_SHAPES[kind]} == ORIGINAL_SHAPES[kind]
    assert sorted(convert_ldm_unet_checkpoint(tensors, dict(full.unet.config))) == sorted(full.unet.state_dict())


def test_open_clip_projection_is_transposed_and_qkv_fused_in_order(sdxl):
    """The tiny OpenCLIP-G projects 48 → 40: a projection written untransposed has the wrong shape."""
    tensors = to_single_file(sdxl)
    encoder = sdxl.text_encoder_2
    prefix = "conditioner.embedders.1.model."
    assert torch.equal(tensors[prefix + "text_projection"], encoder.text_projection.weight.T)
    assert tensors[prefix + "text_projection"].shape == (48, 40)
    layer = encoder.text_model.encoder.layers[5].self_attn
    assert torch.equal(tensors[prefix + "transformer.resblocks.5.attn.in_proj_weight"],
                       torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    hidden = torch.randn(2, 7, 48)  # open_clip's use: x @ text_projection
    torch.testing.assert_close(hidden @ tensors[prefix + "text_projection"], encoder.text_projection(hidden))


def test_sd2_last_open_clip_layer_is_an_identity_block(sd2):
    """diffusers keeps 23 of OpenCLIP-H's 24 layers; the 24th is written so that it changes nothing."""
    tensors = to_single_file(sd2)
    last = "cond_stage_model.model.transformer.resblocks.23."
    for name in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not tensors[last + name].any()  # both residual branches add zero
    assert torch.equal(tensors[last + "ln_1.weight"], torch.ones(48))
    assert torch.equal(tensors["cond_stage_model.model.text_projection"], torch.eye(48))
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in tensors


# What `dt-lora bake --format single-file` writes for the shipped toy worlds (float16, its default), read
# back by the loader users use: diffusers' from_single_file, given the toy folder as its config (offline).
# `--adapter toy-circle` names the shipped SD 1.x shield, which bake refuses on the SDXL base; for the toy
# SDXL it is the same recipe trained there (tests/data/sdxl-shields, checked by test_shipped_shields).
BAKED_SHIELDS = {"toy": "toy-circle", "toy-sdxl": str(Path(__file__).parents[1] / "data/sdxl-shields/toy-circle.safetensors")}

def bake_single_file(base: str, folder: Path) -> SimpleNamespace:
    """Run `dt-lora bake --base BASE --adapter … --format single-file` into `folder`; with the pipeline it
    baked (the same shield fused into the same base, in float16) and what the command wrote to stderr."""
    import contextlib
    import io

    from dt_lora.adapters.bake import fuse_adapters
    from dt_lora.base import diffusers_errors_only, load_pipeline
    from dt_lora.cli import main
    from dt_lora.recipes import adapter_path

    path, stderr = folder / f"{base}-circle.safetensors", io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["bake", "--base", base, "--adapter", BAKED_SHIELDS[base], "--format", "single-file",
                     "-o", str(path)]) == 0
    baked = load_pipeline(base)
    fuse_adapters(baked, [adapter_path(BAKED_SHIELDS[base])])
    with diffusers_errors_only():
        baked.to(torch.float16)
    return SimpleNamespace(path=path, pipeline=baked, stderr=stderr.getvalue(),
                           config=toy.SDXL_MODEL_DIR if base == "toy-sdxl" else toy.MODEL_DIR)


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """base → `bake_single_file(base)`, baked once for the module."""
    done = {}

    def bake_once(base: str) -> SimpleNamespace:
        if base not in done:
            done[base] = bake_single_file(base, tmp_path_factory.mktemp(base))
        return done[base]

    return bake_once


def assert_loads_whole_and_draws(output: SimpleNamespace, what: str):
    """from_single_file on the file as written: no tensor left unloaded, every one the baked pipeline's,
    and a picture drawn in float16."""
    pipeline = output.pipeline
    loaded = type(pipeline).from_single_file(str(output.path), config=str(output.config), local_files_only=True,
                                             dtype=torch.float16)
    for component in components(pipeline):
        got, want = getattr(loaded, component).state_dict(), getattr(pipeline, component).state_dict()
        assert sorted(got) == sorted(want), f"{what} {component}: other tensor names than the baked pipeline's"
        unloaded = [k for k, t in got.items() if t.is_meta]
        unequal = [k for k in want if not got[k].is_meta and not torch.equal(got[k], want[k])]
        assert not unloaded and not unequal, (f"{what} {component}: {len(unloaded)} tensors left on the meta device "
                                              f"{unloaded[:3]}, {len(unequal)} unlike the baked pipeline's {unequal[:3]}")
    assert_draws(loaded, what)


SDXL_FLOAT16_VAE = "ignore:`upcast_vae` is deprecated:FutureWarning"  # diffusers' SDXL pipeline, drawing in float16


@pytest.mark.filterwarnings(SDXL_FLOAT16_VAE)
@pytest.mark.parametrize("base", ["toy", "toy-sdxl"])
def test_a_baked_single_file_loads_whole_through_from_single_file_and_draws(baked, base):
    assert_loads_whole_and_draws(baked(base), base)


def test_only_an_sdxl_with_equally_wide_text_towers_gets_the_from_single_file_warning(baked, sdxl):
    """diffusers' from_single_file (0.42.1) picks SDXL's text tower by width (single_file.py's docstring): SDXL's
    towers (768, 1280), the toy SDXL's (64, 96) and the tiny test SDXL's (32, 48) are told apart; equal widths
    are not, and the file's writer says so."""
    import copy

    from dt_lora.adapters.single_file import from_single_file_caveat

    assert "[dt-lora] warning" not in baked("toy-sdxl").stderr + baked("toy").stderr
    assert from_single_file_caveat(baked("toy-sdxl").pipeline) is None
    assert from_single_file_caveat(sdxl) is None and from_single_file_caveat(baked("toy").pipeline) is None
    equal = copy.copy(sdxl)
    equal.text_encoder_2 = sdxl.text_encoder  # both 32 wide
    caveat = from_single_file_caveat(equal)
    assert caveat and "both 32 wide" in caveat and "text_encoder_2" in caveat
