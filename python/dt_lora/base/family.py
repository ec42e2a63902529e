"""Model families: what differs between SD 1.x, SD 2.x and SDXL, in one place.

    family   UNet                                   prompt conditioning                     UNet's target
    sd1      conv proj_in/proj_out                  CLIP-L last hidden state                noise (epsilon)
    sd2      linear proj_in/proj_out                OpenCLIP-H (23 layers) last hidden      as the scheduler says:
                                                                                            epsilon or v (768)
    sdxl     text-time added embedding              CLIP-L and OpenCLIP-G penultimate      epsilon
                                                    hidden states, concatenated; pooled
                                                    OpenCLIP-G embedding + time ids

The family is read from the UNet's config (`family_of`): an SDXL UNet has the "text_time" added
embedding, an SD 2.x UNet linear projections in its transformers, an SD 1.x UNet neither. The toy
world is an SD 1.x-architecture model.

Training, the attack and the locality directions call the UNet through `Conditioning.unet_inputs()`,
so every UNet call (the distillation reference included) gets SDXL's `added_cond_kwargs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
LABELS = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}


def family_of(unet_config: Any) -> str:
    """"sd1", "sd2" or "sdxl" for a UNet2DConditionModel config (a dict or a FrozenDict)."""
    get = unet_config.get if isinstance(unet_config, Mapping) else lambda key, default=None: getattr(unet_config, key, default)
    if get("addition_embed_type") == "text_time":
        return SDXL
    return SD2 if get("use_linear_projection", False) else SD1


def family(pipeline) -> str:
    return family_of(pipeline.unet.config)


def label(name: str) -> str:
    return LABELS.get(name, name)


@dataclass
class Conditioning:
    """The prompt inputs of a UNet call, one row per prompt.

    `embeds` (N, L, D) are the encoder hidden states; SDXL adds `pooled` (N, P), the second text
    encoder's projected embedding, and `time_ids` (N, 6): original size, crop corner, target size.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name: what a data shard stores."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "Conditioning":
        return cls(**{f.name: tensors[f.name] for f in fields(cls) if f.name in tensors})

    def _map(self, function) -> "Conditioning":
        return Conditioning(**{name: function(tensor) for name, tensor in self.tensors().items()})

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda tensor: tensor[index])

    def to(self, device) -> "Conditioning":
        return self._map(lambda tensor: tensor.to(device))

    def repeat(self, times: int) -> "Conditioning":
        """Every row `times` times, the whole set after itself (as `torch.Tensor.repeat` on dim 0)."""
        return self._map(lambda tensor: tensor.repeat(times, *(1,) * (tensor.ndim - 1)))

    def repeat_interleave(self, times: int) -> "Conditioning":
        """Every row `times` times in a row (as `torch.Tensor.repeat_interleave` on dim 0)."""
        return self._map(lambda tensor: tensor.repeat_interleave(times, 0))

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Row i from `other` where `mask[i]` (`other` may have one row, broadcast), else from self."""
        replacement = other.tensors()
        return Conditioning(**{name: torch.where(mask.view(-1, *(1,) * (tensor.ndim - 1)).to(tensor.device),
                                                 replacement[name].to(tensor.device), tensor)
                               for name, tensor in self.tensors().items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        names = parts[0].tensors().keys()
        return Conditioning(**{name: torch.cat([part.tensors()[name] for part in parts]) for name in names})

    def unet_inputs(self) -> dict[str, Any]:
        """Keyword arguments of `UNet2DConditionModel.forward` after (sample, timestep)."""
        inputs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            inputs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return inputs


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipelines tokenize."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def prompt_ids(pipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
    """One id tensor per text encoder (SDXL's two tokenizers pad differently)."""
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if family(pipeline) == SDXL else [])
    return [tokenize(tokenizer, prompts) for tokenizer in tokenizers]


def ids_for_encoders(pipeline, ids: torch.Tensor) -> list[torch.Tensor]:
    """`prompt_ids` from the first tokenizer's ids (P, L), for prompts that exist as ids only (the attack's).

    SDXL's two tokenizers share the vocabulary and differ only in padding: OpenCLIP-G's pads with "!"
    after the end token, where CLIP-L's repeats the end token.
    """
    if family(pipeline) != SDXL:
        return [ids]
    after_end = torch.arange(ids.shape[1]) > (ids == pipeline.tokenizer.eos_token_id).int().argmax(1, keepdim=True)
    return [ids, torch.where(after_end, pipeline.tokenizer_2.pad_token_id, ids)]


def text_encoders(pipeline) -> list:
    return [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family(pipeline) == SDXL else [])


def encode_ids(pipeline, ids: Sequence[torch.Tensor]) -> Conditioning:
    """The UNet's prompt inputs for token ids (one tensor per text encoder), as the pipelines compute them.

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states,
    concatenated, and the second encoder's projected pooled embedding, with the time ids of the
    pipeline's default size. Not under no_grad: the attack differentiates through it.
    """
    embeds, pooled = encoder_outputs(text_encoders(pipeline), ids)
    if pooled is None:
        return Conditioning(embeds)
    return Conditioning(embeds, pooled, time_ids(pipeline).to(embeds.device).expand(len(embeds), -1))


def encoder_outputs(encoders: Sequence, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) of `text_encoders(pipeline)`, or of copies of them (a guard
    in training), for token ids (one tensor per encoder): what `encode_ids` gives the UNet."""
    if len(encoders) == 1:
        return encoders[0](ids[0].to(encoders[0].device))[0], None
    hidden, pooled = [], None
    for encoder, encoder_ids in zip(encoders, ids):
        output = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder's projected embedding (CLIPTextModelWithProjection.text_embeds)
    return torch.cat(hidden, dim=-1), pooled


def encode_for_one_encoder(pipeline, prompts: Sequence[str], encoder: int) -> Conditioning:
    """SDXL: `prompts` given to text encoder `encoder` alone (0: CLIP-L, 1: OpenCLIP-G, which also makes the
    pooled embedding) and the empty prompt to the other, as `pipeline(prompt=…, prompt_2=…)` with one of
    them empty computes them; float32 on the CPU."""
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
    texts = [[""] * len(prompts), [""] * len(prompts)]
    texts[encoder] = list(prompts)
    with torch.no_grad():
        ids = [tokenize(tokenizer, batch) for tokenizer, batch in zip(tokenizers, texts)]
        return encode_ids(pipeline, ids)._map(lambda tensor: tensor.float().cpu())


def encode_prompts(pipeline, prompts: Sequence[str]) -> Conditioning:
    """The UNet's prompt inputs for `prompts`, float32 on the CPU (what the data cache holds)."""
    with torch.no_grad():
        return encode_ids(pipeline, prompt_ids(pipeline, prompts))._map(lambda tensor: tensor.float().cpu())


def unconditional_prompt(pipeline) -> Conditioning:
    """The prompt inputs classifier-free guidance uses as unconditional: the empty prompt's, or zeros
    where the SDXL pipeline is configured so (`force_zeros_for_empty_prompt`, as SDXL base is)."""
    empty = encode_prompts(pipeline, [""])
    if family(pipeline) == SDXL and pipeline.config.get("force_zeros_for_empty_prompt", False):
        return Conditioning(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled), empty.time_ids)
    return empty


def image_size(pipeline) -> int:
    """The side of the images the pipeline draws by default, in pixels."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def size_ids(side: int) -> torch.Tensor:
    """SDXL's (1, 6) time ids for an uncropped square image of `side` pixels: (h, w, 0, 0, h, w)."""
    return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)


def time_ids(pipeline) -> torch.Tensor:
    """The time ids of an image at the pipeline's default size."""
    return size_ids(image_size(pipeline))


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at noise level `alphas` (ᾱ_t, broadcastable): the noise, or the
    velocity √ᾱ·ε − √(1−ᾱ)·x₀ where the scheduler's `prediction_type` is v_prediction (SD 2.x 768)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")
