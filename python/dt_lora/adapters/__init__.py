"""Shield adapter files: LoRA weights in diffusers/peft key format plus dt-lora provenance.

An adapter is one .safetensors file that diffusers' `load_lora_weights` loads as it is:

- tensors `unet.<module path>.lora_A.weight` / `.lora_B.weight`;
- optionally text-encoder parts, `text_encoder.<module path>.lora_A.weight` / `.lora_B.weight` (and, on
  SDXL, `text_encoder_2.…`): the shield's context guard (guard.py), which diffusers loads into the text
  encoders, stacks and fuses with the UNet part;
- metadata `lora_adapter_metadata`: each part's peft `LoraConfig` (rank, alpha, targets), with keys
  prefixed `unet.` / `text_encoder.` / `text_encoder_2.` as diffusers writes and reads them, so alpha ≠
  rank keeps its scale;
- metadata `dt_lora`: JSON `{"concepts": [...]}`, one entry per shielded concept (recipe summary,
  base model and its UNet fingerprint, version, training time). A merged file lists several.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from dt_lora.errors import NonFinite, UserError
from dt_lora.tensorfiles import write_safetensors

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DT_METADATA_KEY = "dt_lora"
UNET_PREFIX = "unet."
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the pipeline's text encoders; a part's key prefix is "<name>."


class AdapterError(UserError, ValueError):
    """An adapter file is missing, not safetensors, damaged, or not a dt-lora/diffusers LoRA."""


@dataclass
class AdapterFile:
    weights: dict[str, torch.Tensor]  # UNet module keys without the "unet." prefix
    lora_config: dict  # peft LoraConfig.to_dict(), JSON-ready
    concepts: list[dict] = field(default_factory=list)
    # the text-encoder parts (a context guard), by pipeline component ("text_encoder", SDXL's "text_encoder_2"):
    # AdapterFiles of their own, keyed by the encoder's module paths, with their own rank and alpha and no
    # concepts; empty for a shield of the UNet alone
    text_encoders: dict[str, AdapterFile] = field(default_factory=dict)

    def parts(self) -> list[tuple[str, AdapterFile]]:
        """(key prefix, part) for the UNet part and each text-encoder part."""
        return [(UNET_PREFIX, self)] + [(f"{name}.", self.text_encoders[name])
                                        for name in TEXT_ENCODERS if name in self.text_encoders]

    @property
    def rank(self) -> int:
        return int(self.lora_config["r"])

    @property
    def alpha(self) -> float:
        return float(self.lora_config["lora_alpha"])

    @property
    def scale(self) -> float:
        """What peft multiplies B·A by: alpha/r, or alpha/√r for rank-stabilised LoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.lora_config.get("use_rslora") else self.rank)

    @classmethod
    def from_training(cls, weights: dict[str, torch.Tensor], *, recipe, base: str, base_fingerprint: str,
                      version: str, seconds: float, processes: int = 1, family: str = "sd1",
                      text_encoders: dict[str, AdapterFile] | None = None,
                      guard_seconds: float = 0.0, recipe_fingerprint: str | None = None) -> "AdapterFile":
        from peft import LoraConfig

        config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
                            target_modules=list(recipe.lora.targets), init_lora_weights="gaussian")
        concept = {
            "name": recipe.name,
            "prompts": recipe.target_prompts,
            "paraphrases": recipe.target.paraphrases,
            "anchors": recipe.anchor_prompts,
            "scramble": {"grid": recipe.scramble.grid, "space": recipe.scramble.space, "flips": recipe.scramble.flips},
            "lora": {"rank": recipe.lora.rank, "alpha": recipe.lora.alpha, "targets": list(recipe.lora.targets),
                     "text_local": recipe.lora.text_local},
            "train": {"steps": recipe.train.steps, "seed": recipe.train.seed, "learning_rate": recipe.train.learning_rate,
                      "preservation": recipe.train.preservation,
                      "preservation_weight": recipe.train.preservation_weight,
                      "anchor_scale_jitter": recipe.train.anchor_scale_jitter,
                      "target_scale_min": recipe.train.target_scale_min,
                      "adversarial_rounds": recipe.train.adversarial_rounds,
                      "prompt_contexts": recipe.train.prompt_contexts,
                      "split_encoders": recipe.train.split_encoders,
                      "batch_size": recipe.train.batch_size, "processes": processes},
            "sampling": {"steps": recipe.sampling.steps, "guidance": recipe.sampling.guidance},
            **({"guard": {**vars(recipe.guard), "training_seconds": round(guard_seconds, 1)}}
               if text_encoders else {}),
            "recipe_fingerprint": recipe_fingerprint or recipe.fingerprint(),  # the recipe as the user wrote it
            "base": base,
            "family": family,
            "base_fingerprint": base_fingerprint,
            "dt_lora_version": version,
            "training_seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls({k: v.detach().float().cpu() for k, v in weights.items()}, _jsonable(config.to_dict()), [concept],
                   dict(text_encoders or {}))


def _jsonable(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def adapter_family(adapter: AdapterFile) -> str:
    """The model family the adapter's shields were trained on ("sd1" for files older than the record)."""
    families = {concept.get("family", "sd1") for concept in adapter.concepts} or {"sd1"}
    if len(families) > 1:
        raise ValueError(f"the adapter mixes shields of several model families ({', '.join(sorted(families))})")
    return families.pop()


def write_adapter(path: str | Path, adapter: AdapterFile) -> Path:
    """Write atomically: readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    parts = adapter.parts()
    for prefix, part in parts:
        lora_layers(part, source=path, prefix=prefix)  # never write a file that read_adapter would refuse
    tensors = {prefix + k: v for prefix, part in parts for k, v in part.weights.items()}
    config = {prefix + k: v for prefix, part in parts for k, v in part.lora_config.items()}
    metadata = {
        "format": "pt",
        LORA_METADATA_KEY: json.dumps(config, sort_keys=True),
        DT_METADATA_KEY: json.dumps({"kind": "adapter", "concepts": adapter.concepts}),
    }
    return write_safetensors(path, tensors, metadata)


class LoraLayer(NamedTuple):
    """One adapted layer: it adds `scale · B @ A` to the layer's (out × in) weight."""

    A: torch.Tensor  # (rank, in)
    B: torch.Tensor  # (out, rank)
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of the weight this layer adapts."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> torch.Tensor:
        """The float32 weight delta this layer adds."""
        return self.scale * (self.B.float() @ self.A.float())


_A, _B = ".lora_A.weight", ".lora_B.weight"
# peft options under which a layer's delta is not scale · B @ A, or not one scale for the whole file
_UNSUPPORTED = {"use_dora": "DoRA", "rank_pattern": "per-layer ranks (rank_pattern)",
                "alpha_pattern": "per-layer alphas (alpha_pattern)", "lora_bias": "LoRA biases (lora_bias)"}


def lora_layers(adapter: AdapterFile, *, source: str | Path | None = None,
                prefix: str = UNET_PREFIX) -> dict[str, LoraLayer]:
    """layer → its validated `LoraLayer`, in layer-name order; every reader of adapter weights uses this.
    `adapter` is one part of a file (the file itself, or one of its `text_encoders`; `prefix` names the part's
    keys).

    Raises `AdapterError` naming `source` and the tensor when the adapter is malformed: an A without
    its B (or the reverse), rank 0, A and B whose inner dimensions disagree or whose rank is not the
    config's r, tensors that are not floating-point matrices, NaN or inf weights.
    """
    where = f"{source}: " if source is not None else ""
    rank = _checked_config(adapter.lora_config, where, prefix)
    scale = adapter.scale
    layers = {}
    for key in sorted(adapter.weights):
        if key.endswith(_B):
            if key[: -len(_B)] + _A not in adapter.weights:
                raise AdapterError(f"{where}tensor {prefix}{key} has no matching {prefix}{key[:-len(_B)]}{_A}")
            continue
        if not key.endswith(_A):
            raise AdapterError(f"{where}unexpected tensor {prefix}{key!r} (expected {prefix}*.lora_A/B.weight)")
        layer = key[: -len(_A)]
        if layer + _B not in adapter.weights:
            raise AdapterError(f"{where}tensor {prefix}{key} has no matching {prefix}{layer}{_B}")
        a, b = adapter.weights[key], adapter.weights[layer + _B]
        for name, tensor in ((key, a), (layer + _B, b)):
            _check_tensor(tensor, where + f"tensor {prefix}{name}")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}tensor {prefix}{layer}{_A} is {_dims(a)} and {prefix}{layer}{_B} "
                               f"is {_dims(b)}: their inner dimensions (the rank) must be equal")
        if a.shape[0] != rank:
            raise AdapterError(f"{where}tensor {prefix}{key} has rank {a.shape[0]} but the metadata "
                               f"'{LORA_METADATA_KEY}' says {prefix}r = {rank}")
        layers[layer] = LoraLayer(a, b, scale)
    if not layers:
        raise AdapterError(f"{where}holds no LoRA tensors")
    return layers


def _checked_config(config: dict, where: str, prefix: str) -> int:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{where}metadata '{LORA_METADATA_KEY}' has {prefix}r = {rank!r}; the rank must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{where}metadata '{LORA_METADATA_KEY}' has {prefix}lora_alpha = {alpha!r}; "
                           "expected a finite number > 0")
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterError(f"{where}uses {what}, which dt-lora does not support")
    targets = config.get("target_modules")
    # diffusers builds a peft LoraConfig from this metadata; without targets peft guesses them from a
    # `model_type` the UNet does not have, and fails deep inside the load
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise AdapterError(f"{where}metadata '{LORA_METADATA_KEY}' has {prefix}target_modules = {targets!r}; "
                           "expected the adapted layers' names (a list of strings)")
    from peft import LoraConfig

    try:
        LoraConfig(**config)
    except (TypeError, ValueError) as error:
        problem = (str(error).splitlines() or [type(error).__name__])[0]
        raise AdapterError(f"{where}metadata '{LORA_METADATA_KEY}' is not a LoRA config peft accepts "
                           f"({prefix[:-1]} part: {problem})") from None
    return rank


def _check_tensor(tensor: torch.Tensor, what: str) -> None:
    if tensor.ndim != 2:
        raise AdapterError(f"{what} has shape {tuple(tensor.shape)}; expected a matrix (2 dimensions)")
    if 0 in tensor.shape:
        raise AdapterError(f"{what} is {_dims(tensor)}: rank 0 or an empty layer")
    if not tensor.is_floating_point():
        raise AdapterError(f"{what} has dtype {tensor.dtype}; expected floating point")
    if not torch.isfinite(tensor).all():
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        raise AdapterError(f"{what} holds {nan} NaN and {inf} inf value(s)")


def _dims(tensor: torch.Tensor) -> str:
    return "×".join(str(n) for n in tensor.shape)


def read_adapters(paths: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[AdapterFile]:
    """Read and validate adapter files, and check each at its stacking weight (`check_strengths`): what every
    command does with its adapters before it loads a model."""
    adapters = [read_adapter(path) for path in paths]
    check_strengths(adapters, list(weights) if weights is not None else [1.0] * len(adapters), paths)
    return adapters


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and validate an adapter file (see `lora_layers`); every problem is an `AdapterError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: not a readable .safetensors file ({error})") from None
    if LORA_METADATA_KEY not in metadata:
        raise AdapterError(f"{path}: no '{LORA_METADATA_KEY}' metadata; not a dt-lora/diffusers LoRA adapter")
    prefixes = (UNET_PREFIX,) + tuple(f"{name}." for name in TEXT_ENCODERS)
    try:
        lora = json.loads(metadata[LORA_METADATA_KEY])
        concepts = json.loads(metadata.get(DT_METADATA_KEY, '{"concepts": []}'))["concepts"]
        configs = {prefix: {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)} for prefix in prefixes}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise AdapterError(f"{path}: damaged metadata ({error})") from None
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        raise AdapterError(f"{path}: damaged metadata ('{DT_METADATA_KEY}' concepts is not a list of objects)")
    weights: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for key, value in tensors.items():
        prefix = next((p for p in weights if key.startswith(p)), None)
        if prefix is None or not key.endswith((_A, _B)):
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected unet.*.lora_A/B.weight, or "
                               f"text_encoder.* / text_encoder_2.*.lora_A/B.weight)")
        weights[prefix][key[len(prefix):]] = value
    for prefix in (p for p in prefixes if p == UNET_PREFIX or weights[p]):
        if "r" not in configs[prefix] or "lora_alpha" not in configs[prefix]:
            raise AdapterError(f"{path}: metadata '{LORA_METADATA_KEY}' lacks {prefix}r / {prefix}lora_alpha")
    text_encoders = {name: AdapterFile(weights[f"{name}."], configs[f"{name}."])
                     for name in TEXT_ENCODERS if weights[f"{name}."]}
    adapter = AdapterFile(weights[UNET_PREFIX], configs[UNET_PREFIX], concepts, text_encoders)
    for prefix, part in adapter.parts():
        lora_layers(part, source=path, prefix=prefix)
    return adapter


# The largest weight change an adapter may make to one weight: what float16, the precision SD is drawn in,
# can hold. Real shields change weights by well under 1; a change beyond this draws NaN (black images) or
# bakes inf weights, whatever the base.
MAX_WEIGHT_CHANGE = float(torch.finfo(torch.float16).max)


def check_strengths(adapters: Sequence[AdapterFile], weights: Sequence[float],
                    sources: Sequence[str | Path]) -> None:
    """Refuse an adapter whose weight change at its stacking weight, w·(α/r)·B·A, is not finite or exceeds
    `MAX_WEIGHT_CHANGE` anywhere: a weight that is NaN or inf, or one (or a file's lora_alpha or lora_B) so
    large that the shield would draw NaN. Costs nothing for ordinary adapters: the product is computed only
    when a bound on it is not already small."""
    for adapter, weight, source in zip(adapters, weights, sources):
        if not math.isfinite(weight):
            raise NonFinite(f"{source}: the adapter weight {weight} is not a finite number")
        for prefix, part in adapter.parts():
            for layer, lora in lora_layers(part, source=source, prefix=prefix).items():
                bound = (abs(weight) * abs(lora.scale) * lora.A.shape[0]
                         * float(lora.A.abs().max()) * float(lora.B.abs().max()))
                if bound <= MAX_WEIGHT_CHANGE:
                    continue
                change = float((weight * lora.scale * (lora.B.double() @ lora.A.double())).abs().max())
                if change <= MAX_WEIGHT_CHANGE:
                    continue
                raise NonFinite(f"{source}: at weight {weight:g} it changes {prefix}{layer} by up to {change:.3g}, "
                                f"beyond the {MAX_WEIGHT_CHANGE:g} that float16 holds: the weight, or the file's "
                                f"lora_alpha ({part.alpha:g}) or lora_B values, are far too large")


def pipeline_text_encoders(pipeline) -> dict:
    """The pipeline's text encoders by component name: what an adapter's text-encoder parts go on."""
    return {name: getattr(pipeline, name) for name in TEXT_ENCODERS if getattr(pipeline, name, None) is not None}


def part_models(unet, text_encoders: Mapping | None = None) -> dict:
    """Key prefix → the model that the adapter part of that prefix goes on (`parts()`' prefixes)."""
    return {UNET_PREFIX: unet, **{f"{name}.": model for name, model in (text_encoders or {}).items()}}


def check_fits(adapters: Sequence[AdapterFile], unet, *, force: bool = False,
               sources: Sequence[str | Path] | None = None, text_encoders: Mapping | None = None,
               offers_force: bool = True) -> None:
    """Refuse adapters that do not fit `unet` (and `text_encoders`, `pipeline_text_encoders`' map, for adapters
    with text-encoder parts): raises `AdapterError` naming the file and the layer.

    Every adapted layer must be a Linear layer of the model whose weight is (out × in) as the adapter's
    B·A; and each shielded concept must have been trained on this UNet (its recorded fingerprint equals
    `unet_fingerprint(unet)`) unless `force`. Adapters already loaded on `unet` do not change the answer.
    `offers_force`: whether the caller's command has a --force for the message to suggest (`attack` has none:
    it measures a shield on the model it was trained on).
    """
    from dt_lora.base import unet_fingerprint
    from dt_lora.base.family import family_of, label

    sources = [str(s) for s in sources] if sources is not None else [f"adapter {i}" for i in range(len(adapters))]
    models = part_models(unet, text_encoders)
    family = family_of(unet.config)
    for adapter, source in zip(adapters, sources):
        for concept in adapter.concepts:  # before the layers: a layer error would not say why nothing fits
            if concept.get("family", family) != family:
                raise AdapterError(f"{source}: {concept.get('name', '?')} is an {label(concept['family'])} shield and "
                                   f"this base is {label(family)}; train it again on this base")
        for prefix, part in adapter.parts():
            if models.get(prefix) is None:
                raise AdapterError(f"{source}: has a {prefix[:-1]} part (a context guard), and this base has no "
                                   f"{prefix[:-1]} to put it on")
            _check_layers(part, dict(models[prefix].named_modules()), source, prefix)
    if force or not any(c.get("base_fingerprint") for adapter in adapters for c in adapter.concepts):
        return
    fingerprint = unet_fingerprint(unet)  # costly on a real UNet: once for all adapters
    for adapter, source in zip(adapters, sources):
        foreign = [c.get("name", "?") for c in adapter.concepts if c.get("base_fingerprint") not in (None, fingerprint)]
        if foreign:
            raise AdapterError(f"{source}: shield(s) {', '.join(foreign)} were trained on another base model (UNet "
                               f"fingerprint differs from this base's {fingerprint})"
                               + ("; pass --force to use them anyway" if offers_force else ""))


def _check_layers(part: AdapterFile, modules: dict, source: str, prefix: str) -> None:
    for layer, lora in lora_layers(part, source=source, prefix=prefix).items():
        module = modules.get(layer)
        module = getattr(module, "base_layer", module)  # a layer that already carries a peft adapter
        if not isinstance(module, torch.nn.Linear):
            have = "no such layer" if module is None else f"the base's is a {type(module).__name__}, not a Linear layer"
        elif tuple(module.weight.shape) != lora.shape:
            have = f"the base's is {_dims(module.weight)}"
        else:
            continue
        where = "adapter layer" if prefix == UNET_PREFIX else f"{prefix[:-1]} layer"
        raise AdapterError(f"{source}: {where} {layer} ({lora.shape[0]}×{lora.shape[1]}) does not fit this base: {have}")


def load_adapters(pipeline, paths, weights=None, *, force: bool = False) -> list[str]:
    """Stack adapters on a pipeline (diffusers `load_lora_weights` + `set_adapters`); returns their names.

    Each adapter is read and checked to fit the pipeline's UNet (`check_fits`; `force` accepts one
    trained on another base) before diffusers sees it; a layer diffusers still cannot place is an
    `AdapterError`, not a warning, and the pipeline is left without the adapters of this call.
    Names are `shield0`, `shield1`, …; `unload_adapters(pipeline)` removes them again.
    """
    paths = [Path(p) for p in paths]
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"got {len(paths)} adapters but {len(weights)} weights")
    read = read_adapters(paths, weights)
    check_fits(read, pipeline.unet, force=force, sources=paths, text_encoders=pipeline_text_encoders(pipeline))

    names = []
    try:
        for index, path in enumerate(paths):
            name = f"shield{index}"
            with _diffusers_warnings() as unplaced:
                pipeline.load_lora_weights(str(path), adapter_name=name)
            names.append(name)
            if unplaced:
                raise AdapterError(f"{path}: diffusers could not apply every layer: {' '.join(unplaced)}")
        pipeline.set_adapters(names, adapter_weights=weights)
    except BaseException:
        if names:
            pipeline.delete_adapters(names)
        raise
    return names


# diffusers' warnings while loading a LoRA: a layer it could not place (`_maybe_warn_for_unhandled_keys`)
# is an error for dt-lora; the notice that the text encoder got no LoRA keys is expected (a shield without
# a guard holds UNet layers only) and dropped
_UNPLACED = ("unexpected keys", "missing keys")
_TEXT_ENCODER_NOTICE = "No LoRA keys associated to CLIPTextModel"


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _diffusers_warnings():
    """Yields a list that collects the messages of diffusers' warnings about unplaced LoRA keys (the
    caller raises on them); every other diffusers log record but the text-encoder notice is printed as
    usual when the block ends."""
    from diffusers.utils import logging as diffusers_logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = diffusers_logging.get_logger()
    handlers, level, propagate = root.handlers[:], root.level, root.propagate
    root.handlers, root.propagate = [Collect()], False
    root.setLevel(min(root.getEffectiveLevel(), logging.WARNING))
    # transformers reports every key of the text encoder that a LoRA state dict lacks (all of its own
    # weights, and the other shields' LoRA weights) when diffusers loads a guard into it: not a problem
    loading = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "integrations.peft")]
    for logger in loading:
        logger.addFilter(_drop_load_report)
    unplaced: list[str] = []
    try:
        with warnings.catch_warnings():  # peft, on each guard after the first: stacking does exactly that
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            yield unplaced
    finally:
        for logger in loading:
            logger.removeFilter(_drop_load_report)
        root.handlers, root.propagate = handlers, propagate
        root.setLevel(level)
        for record in records:
            message = record.getMessage()
            if any(text in message for text in _UNPLACED):
                unplaced.append(" ".join(message.split()))  # one line, for the CLI's error
            elif _TEXT_ENCODER_NOTICE not in message and root.isEnabledFor(record.levelno):
                root.handle(record)


def unload_adapters(pipeline) -> None:
    pipeline.unload_lora_weights()
