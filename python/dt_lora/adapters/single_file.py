"""A diffusers SD 1.x, SD 2.x or SDXL pipeline as one original-layout checkpoint, the file AUTOMATIC1111
and ComfyUI load (SD 1.x/2.x: CompVis/LDM; SDXL: Stability's SGM).

diffusers converts only the other way (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`); this module
is the inverse, written as tables so the whole mapping reads at once. docs/single-file-keys.md is the
same mapping in markdown, with SD 1.5's names. Every key is

    <component prefix> . <block> . <layer inside the block> . weight | bias

    family   component        diffusers          single file
    all      UNet             unet.*             model.diffusion_model.*
    all      VAE              vae.*              first_stage_model.*
    SD 1.x   CLIP-L           text_encoder.*     cond_stage_model.transformer.text_model.*
    SD 2.x   OpenCLIP-H       text_encoder.*     cond_stage_model.model.*
    SDXL     CLIP-L           text_encoder.*     conditioner.embedders.0.transformer.text_model.*
    SDXL     OpenCLIP-G       text_encoder_2.*   conditioner.embedders.1.model.*

An SDXL UNet's added text-time embedding is `label_emb.0.0` / `label_emb.0.2`; SD 2.x and SDXL
transformers have linear `proj_in`/`proj_out`, written as the Linear weights they are.

OpenCLIP (open_clip's TextTransformer) differs from transformers' CLIPTextModel beyond names
(`open_clip_to_ldm`): q, k and v are one `attn.in_proj_weight`/`in_proj_bias` (rows q, k, v);
`positional_embedding` and `text_projection` are bare parameters, the projection used as x @ P, so it is
diffusers' `text_projection.weight` transposed; `logit_scale` is CLIP's (ln 100, unused by SD). SD 2.x
reads the penultimate layer, and diffusers keeps only the 23 layers it uses, without the projection; the
single file gets OpenCLIP-H's 24th layer as an identity block (zero output projections) and an identity
projection, so its key list is the original's and no image changes. CLIP-L's `position_ids` buffer
(0 … 76) is written as the original checkpoints hold it.

Blocks are numbered from the model config (`unet_blocks`, `vae_blocks`; L = layers_per_block,
n = number of blocks, i = block, j = layer within it):

    UNet                                     single file
    conv_in                                  input_blocks.0.0
    time_embedding.linear_1 / .linear_2      time_embed.0 / time_embed.2
    down_blocks.i.resnets.j                  input_blocks.{i*(L+1)+j+1}.0        UNET_RESNET
    down_blocks.i.attentions.j               input_blocks.{i*(L+1)+j+1}.1        UNET_TRANSFORMER
    down_blocks.i.downsamplers.0   (i<n-1)   input_blocks.{(i+1)*(L+1)}.0        conv → op
    mid_block.resnets.0 / .attentions.0 / .resnets.1   middle_block.0 / .1 / .2
    up_blocks.i.resnets.j          (j ≤ L)   output_blocks.{i*(L+1)+j}.0         UNET_RESNET
    up_blocks.i.attentions.j       (j ≤ L)   output_blocks.{i*(L+1)+j}.1         UNET_TRANSFORMER
    up_blocks.i.upsamplers.0       (i<n-1)   output_blocks.{i*(L+1)+L}.1, .2 if the block has attentions
    conv_norm_out / conv_out                 out.0 / out.2

    VAE (encoder.* / decoder.*)              single file
    conv_in / conv_out / conv_norm_out       conv_in / conv_out / norm_out
    encoder.down_blocks.i.resnets.j          encoder.down.i.block.j              VAE_RESNET
    encoder.down_blocks.i.downsamplers.0     encoder.down.i.downsample
    decoder.up_blocks.i.resnets.j  (j ≤ L)   decoder.up.{n-1-i}.block.j          VAE_RESNET
    decoder.up_blocks.i.upsamplers.0         decoder.up.{n-1-i}.upsample
    mid_block.resnets.0 / .resnets.1         mid.block_1 / mid.block_2           VAE_RESNET
    mid_block.attentions.0                   mid.attn_1                          VAE_ATTENTION
    quant_conv / post_quant_conv             unchanged

Inside a block the module-level tables below rename the layers; `{n}` stands for any index and is
kept. The VAE's attention projections are Linear in diffusers and 1×1 Conv2d in the original, so
their [C, C] weights are written as [C, C, 1, 1].

Every tensor of the three components must map: a key no table covers (an attached LoRA's `lora_A`
or `base_layer`, a block type SD 1.x does not have) raises ValueError naming it, never drops it.

An SDXL file whose two text towers are equally wide is right, but diffusers' `from_single_file`
(0.42.1) loads its `text_encoder_2` wrongly. `create_diffusers_clip_model_from_ldm`
(diffusers/loaders/single_file_utils.py) builds each text encoder from the whole file and picks the
tower by width, not by the component it is loading:

    elif (is_clip_sdxl_model(checkpoint)
          and checkpoint[CHECKPOINT_KEY_NAMES["clip_sdxl"]].shape[-1] == position_embedding_dim):
        diffusers_format_checkpoint = convert_ldm_clip_checkpoint(checkpoint)  # the CLIP-L tower

With CLIP-L as wide as `text_encoder_2`, `text_encoder_2` gets CLIP-L's weights, and its
`text_projection` (CLIP-L has none) stays on the meta device. SDXL's towers (768 and 1280 wide) and the
toy SDXL's (64 and 96, built unequal for this reason) never meet that condition. The file cannot steer
it and keep the original layout: the condition reads only whether
`conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight` is there (A1111
and ComfyUI need it) and its width (the model's). So for such a model `write_single_file` warns
(`from_single_file_caveat`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

Table = tuple[tuple[str, str], ...]

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# family → component → its prefix in the single file, and whether it is CLIP-L or OpenCLIP
COMPONENTS = {
    "sd1": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
OPEN_CLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}

# A block that is itself one layer (conv_in, quant_conv, …): only `weight`/`bias` follow its name.
LAYER: Table = (("", ""),)

UNET_FIXED: Table = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
UNET_TEXT_TIME: Table = (  # SDXL: the pooled text and size embedding added to the time embedding
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
)

# ResnetBlock2D → ldm ResBlock (in_layers = GroupNorm, SiLU, Conv; out_layers = GroupNorm, SiLU, Dropout, Conv)
UNET_RESNET: Table = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)

# Transformer2DModel → ldm SpatialTransformer: the same names. Listed anyway so a stray key is caught.
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TRANSFORMER: Table = (
    ("norm", "norm"),
    ("proj_in", "proj_in"),
    *((f"transformer_blocks.{{n}}.{layer}",) * 2 for layer in (
        "norm1", "norm2", "norm3",
        *(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in _ATTENTION),
        "ff.net.0.proj", "ff.net.2",
    )),
    ("proj_out", "proj_out"),
)

UNET_DOWNSAMPLE: Table = (("conv", "op"),)
SAMPLER: Table = (("conv", "conv"),)  # UNet upsampler, VAE down/upsampler

VAE_FIXED: Table = (
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.conv_norm_out", "encoder.norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_norm_out", "decoder.norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
)

VAE_RESNET: Table = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("conv_shortcut", "nin_shortcut"),
)

# Attention (Linear projections) → ldm AttnBlock (1×1 Conv2d projections: weights reshaped [C, C, 1, 1])
VAE_ATTENTION: Table = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)

# CLIPTextModel: the same names under `cond_stage_model.transformer.text_model.`.
CLIP_TEXT: Table = tuple((name,) * 2 for name in (
    "embeddings.token_embedding",
    "embeddings.position_embedding",
    *(f"encoder.layers.{{n}}.{layer}" for layer in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
    )),
    "final_layer_norm",
))

# open_clip's TextTransformer under the family's prefix. q/k/v get provisional names here and are fused
# into `attn.in_proj_weight`/`in_proj_bias` by `open_clip_to_ldm`, which also drops the `.weight` of
# the bare parameters (`positional_embedding`, `text_projection`).
OPEN_CLIP_TEXT: Table = (
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding", "positional_embedding"),
    *((f"encoder.layers.{{n}}.{d}", f"transformer.resblocks.{{n}}.{ldm}") for d, ldm in (
        ("self_attn.q_proj", "attn.in_proj.q"), ("self_attn.k_proj", "attn.in_proj.k"),
        ("self_attn.v_proj", "attn.in_proj.v"), ("self_attn.out_proj", "attn.out_proj"),
        ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
    )),
    ("final_layer_norm", "ln_final"),
)

UNET_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type → has attentions
UNET_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
UNET_MID_TYPE = "UNetMidBlock2DCrossAttn"
VAE_DOWN_TYPE = "DownEncoderBlock2D"
VAE_UP_TYPE = "UpDecoderBlock2D"
PARAMETERS = ("weight", "bias")


class Block(NamedTuple):
    """One diffusers module prefix, its single-file name and the table for the layers inside it."""

    diffusers: str
    ldm: str
    table: Table
    linear_to_conv: bool = False  # 2-D weights become 1×1 conv weights (the VAE's attention)


def _config(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


def _layers_per_block(config: Any) -> int:
    layers = _config(config, "layers_per_block")
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"layers_per_block {list(layers)} differs between blocks; the single-file "
                             "layout numbers blocks with one count")
        layers = layers[0]
    return int(layers)


def _check_types(kind: str, types: Iterable[str], allowed: Iterable[str]) -> list[str]:
    types = list(types)
    unknown = sorted(set(types) - set(allowed))
    if unknown:
        raise ValueError(f"{kind} {', '.join(unknown)} has no single-file layout "
                         f"(supported: {', '.join(allowed)})")
    return types


def unet_blocks(config: Any) -> list[Block]:
    """The UNet's blocks with their `input_blocks`/`middle_block`/`output_blocks` names, from its config."""
    per = _layers_per_block(config)
    down = _check_types("UNet down block", _config(config, "down_block_types"), UNET_DOWN_TYPES)
    up = _check_types("UNet up block", _config(config, "up_block_types"), UNET_UP_TYPES)
    _check_types("UNet mid block", [_config(config, "mid_block_type")], [UNET_MID_TYPE])

    from dt_lora.base.family import SDXL, family_of

    fixed = UNET_FIXED + (UNET_TEXT_TIME if family_of(config) == SDXL else ())
    blocks = [Block(d, ldm, LAYER) for d, ldm in fixed]
    for i, kind in enumerate(down):
        for j in range(per):
            index = i * (per + 1) + j + 1
            blocks.append(Block(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET))
            if UNET_DOWN_TYPES[kind]:
                blocks.append(Block(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", UNET_TRANSFORMER))
        if i < len(down) - 1:
            blocks.append(Block(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{(i + 1) * (per + 1)}.0",
                                UNET_DOWNSAMPLE))
    blocks += [
        Block("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        Block("mid_block.attentions.0", "middle_block.1", UNET_TRANSFORMER),
        Block("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
    ]
    for i, kind in enumerate(up):
        attention = UNET_UP_TYPES[kind]
        for j in range(per + 1):  # an up block has one layer more than a down block
            index = i * (per + 1) + j
            blocks.append(Block(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET))
            if attention:
                blocks.append(Block(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", UNET_TRANSFORMER))
        if i < len(up) - 1:
            last = i * (per + 1) + per
            blocks.append(Block(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{last}.{2 if attention else 1}",
                                SAMPLER))
    return blocks


def vae_blocks(config: Any) -> list[Block]:
    """The VAE's blocks with their `encoder.down`/`decoder.up`/`mid` names, from its config."""
    per = _layers_per_block(config)
    down = _check_types("VAE down block", _config(config, "down_block_types"), [VAE_DOWN_TYPE])
    up = _check_types("VAE up block", _config(config, "up_block_types"), [VAE_UP_TYPE])

    blocks = [Block(d, ldm, LAYER) for d, ldm in VAE_FIXED]
    for side in ("encoder", "decoder"):
        blocks += [
            Block(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET),
            Block(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION, linear_to_conv=True),
            Block(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET),
        ]
    for i in range(len(down)):
        for j in range(per):
            blocks.append(Block(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET))
        if i < len(down) - 1:
            blocks.append(Block(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", SAMPLER))
    for i in range(len(up)):
        level = len(up) - 1 - i  # the decoder's levels count from the full resolution up
        for j in range(per + 1):
            blocks.append(Block(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET))
        if i < len(up) - 1:
            blocks.append(Block(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{level}.upsample", SAMPLER))
    return blocks


def text_encoder_blocks(config: Any = None) -> list[Block]:
    """CLIPTextModel: one block. transformers ≥ 5.6 dropped the `text_model.` level; older ones have it
    (and CLIPTextModelWithProjection still has it)."""
    return [Block("", "text_model", CLIP_TEXT), Block("text_model", "text_model", CLIP_TEXT)]


def open_clip_blocks(config: Any = None) -> list[Block]:
    """OpenCLIP's text tower: the CLIP blocks' layers under open_clip's names, and SDXL's projection."""
    return [Block("", "", OPEN_CLIP_TEXT), Block("text_model", "", OPEN_CLIP_TEXT),
            Block("text_projection", "text_projection", LAYER)]


BLOCKS = {"unet": unet_blocks, "vae": vae_blocks, "text_encoder": text_encoder_blocks}


def _blocks(family: str, component: str, config: Any) -> list[Block]:
    if (family, component) in OPEN_CLIP:
        return open_clip_blocks(config)
    return BLOCKS["text_encoder" if component == "text_encoder_2" else component](config)


@cache
def _compiled(table: Table) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(re.escape(d).replace(r"\{n\}", r"(\d+)") + r"\Z"), ldm) for d, ldm in table)


def _inner(table: Table, layer: str) -> str | None:
    for pattern, ldm in _compiled(table):
        match = pattern.match(layer)
        if match:
            for index in match.groups():
                ldm = ldm.replace("{n}", index, 1)
            return ldm
    return None


class _Mapper:
    """Renames one component's keys through its blocks; raises on any key no table covers."""

    def __init__(self, component: str, config: Any, family: str = "sd1"):
        if component not in COMPONENTS.get(family, {}):
            raise ValueError(f"unknown component {component!r} of family {family!r}; choose from "
                             f"{', '.join(COMPONENTS.get(family, COMPONENTS['sd1']))}")
        self.component, self.prefix = component, COMPONENTS[family][component]
        self.blocks = {block.diffusers: block for block in _blocks(family, component, config)}

    def __call__(self, key: str) -> tuple[str, Block]:
        parts = key.split(".")
        if parts[-1] in PARAMETERS:
            for cut in range(len(parts) - 1, -1, -1):  # longest block prefix first
                block = self.blocks.get(".".join(parts[:cut]))
                if block is None:
                    continue
                layer = _inner(block.table, ".".join(parts[cut:-1]))
                if layer is None:
                    break
                name = ".".join(part for part in (block.ldm, layer, parts[-1]) if part)
                return self.prefix + name, block
        hint = ""
        if ".lora_" in key or ".base_layer." in key:
            hint = " (a LoRA adapter is attached: fuse it into the weights and unload it first)"
        raise ValueError(f"{self.component} key {key!r} has no name in the single-file layout{hint}")


def component_to_ldm(component: str, config: Any, state_dict: Mapping[str, Any], *, dtype=None,
                     family: str = "sd1") -> dict[str, Any]:
    """One component's diffusers `state_dict` under its single-file names.

    `component` is "unet", "vae", "text_encoder" or (SDXL) "text_encoder_2"; `config` its config (a
    diffusers config dict or a transformers config); `family` "sd1", "sd2" or "sdxl". Tensors are
    detached and contiguous, cast to `dtype` when given; where no copy was needed they share memory with
    `state_dict`.
    """
    rename = _Mapper(component, config, family)
    out = {}
    for key, tensor in state_dict.items():
        name, block = rename(key)
        if name in out:
            raise ValueError(f"{component} keys map to {name!r} twice (the second is {key!r})")
        tensor = tensor.detach()
        if block.linear_to_conv and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        if dtype is not None:
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()
    if (family, component) in OPEN_CLIP:
        return open_clip_to_ldm(out, rename.prefix, config, complete=family == "sd2")
    if component.startswith("text_encoder"):  # CLIP-L: the buffer the original checkpoints hold
        positions = _config(config, "max_position_embeddings")
        out[rename.prefix + "text_model.embeddings.position_ids"] = _arange(positions, out)[None]
    return out


def _arange(count: int, like: Mapping[str, Any]):
    import torch

    device = next(iter(like.values())).device if like else "cpu"
    return torch.arange(count, dtype=torch.int64, device=device)


LOGIT_SCALE = 4.605170249938965  # ln(100): CLIP's learnt temperature saturates at 100


def open_clip_to_ldm(tensors: dict[str, Any], prefix: str, config: Any, *, complete: bool) -> dict[str, Any]:
    """Finish an OpenCLIP text tower renamed by its table: fuse q/k/v, bare parameters, logit_scale.

    `complete` (SD 2.x): add the 24th layer as an identity block and an identity projection, which
    diffusers does not keep (see the module's docstring).
    """
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        head, dot, kind = name.rpartition(".")
        if ".attn.in_proj." in name:  # …resblocks.{n}.attn.in_proj.{q|k|v}.{weight|bias}
            block, part = head.rsplit(".in_proj.", 1)
            fused.setdefault(f"{block}.in_proj_{kind}", {})[part] = tensor
        elif head in (prefix + "positional_embedding", prefix + "text_projection"):
            out[head] = tensor.T.contiguous() if head.endswith("text_projection") else tensor
        else:
            out[name] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    any_tensor = next(iter(out.values()))
    if complete:
        hidden, layers = _config(config, "hidden_size"), _config(config, "num_hidden_layers")
        last = f"{prefix}transformer.resblocks.{layers - 1}."
        new = f"{prefix}transformer.resblocks.{layers}."
        for name in [n for n in out if n.startswith(last)]:  # the shapes of the layer before, as zeros …
            out[new + name[len(last):]] = torch.zeros_like(out[name])
        for norm in ("ln_1", "ln_2"):  # … but norms with unit gain
            out[f"{new}{norm}.weight"] = torch.ones_like(out[f"{new}{norm}.weight"])
        out[prefix + "text_projection"] = torch.eye(hidden, dtype=any_tensor.dtype, device=any_tensor.device)
    out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=any_tensor.dtype, device=any_tensor.device)
    return out


def _components(pipeline) -> dict[str, str]:
    from dt_lora.base.family import family

    return COMPONENTS[family(pipeline)]


def key_table(pipeline) -> list[tuple[str, str]]:
    """(`component.diffusers key`, single-file key) for every tensor of `pipeline`'s UNet, VAE and text
    encoder(s); the single file's fused, added and bare tensors are `to_single_file`'s."""
    from dt_lora.base.family import family

    rows = []
    for component in _components(pipeline):
        model = getattr(pipeline, component)
        rename = _Mapper(component, model.config, family(pipeline))
        rows += [(f"{component}.{key}", rename(key)[0]) for key in model.state_dict()]
    return rows


def to_single_file(pipeline, *, dtype=None) -> dict[str, Any]:
    """The whole single-file state dict of a StableDiffusionPipeline or StableDiffusionXLPipeline (UNet,
    VAE, text encoders).

    Tensors keep the pipeline's dtype unless `dtype` is given, and stay on its device.
    """
    from dt_lora.base.family import family

    tensors = {}
    for component in _components(pipeline):
        model = getattr(pipeline, component)
        tensors.update(component_to_ldm(component, model.config, model.state_dict(), dtype=dtype,
                                        family=family(pipeline)))
    return tensors


def from_single_file_caveat(pipeline) -> str | None:
    """Why diffusers' `from_single_file` will misread this pipeline's single file, or None.

    An SDXL pipeline whose text encoders are equally wide: diffusers picks the SDXL text tower by width
    (see the module's docstring), so it builds `text_encoder_2` from the CLIP-L tower.
    """
    from dt_lora.base.family import SDXL, family

    if family(pipeline) != SDXL:
        return None
    clip_l = _config(pipeline.text_encoder.config, "hidden_size")
    open_clip = _config(pipeline.text_encoder_2.config, "hidden_size")
    if clip_l != open_clip:
        return None
    return (f"text_encoder and text_encoder_2 are both {clip_l} wide: diffusers' from_single_file (0.42.1) "
            "picks SDXL's text tower by width and fills text_encoder_2 from CLIP-L's; AUTOMATIC1111 and ComfyUI "
            "read this file right, for diffusers bake a diffusers folder")


def write_single_file(pipeline, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None,
                      dtype=None) -> Path:
    """Write `pipeline` as one original-layout .safetensors at `path` (atomically); returns `path`.

    `metadata` goes into the safetensors header (string keys and values only).
    """
    from dt_lora.tensorfiles import write_safetensors

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; not so for {bad}")
    tensors = {name: tensor.cpu() for name, tensor in to_single_file(pipeline, dtype=dtype).items()}
    caveat = from_single_file_caveat(pipeline)
    if caveat:
        print(f"[dt-lora] warning: {caveat}", file=sys.stderr, flush=True)
    return write_safetensors(path, tensors, metadata)


__all__ = [
    "CLIP_TEXT", "COMPONENTS", "LAYER", "OPEN_CLIP_TEXT", "SAMPLER", "UNET_DOWNSAMPLE", "UNET_FIXED", "UNET_RESNET",
    "UNET_TRANSFORMER", "VAE_ATTENTION", "VAE_FIXED", "VAE_RESNET", "Block", "component_to_ldm",
    "from_single_file_caveat", "key_table",
    "open_clip_blocks", "open_clip_to_ldm", "text_encoder_blocks", "to_single_file", "unet_blocks", "vae_blocks",
    "write_single_file",
]
