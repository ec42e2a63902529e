"""Base models: `toy` (the embedded toy world; `toy-sdxl` its SDXL twin), `canvas` (the embedded world of
characters and styles), a local diffusers folder, or a Hugging Face Hub id.

Every command that takes `--base` loads it here, through the ordinary diffusers `from_pretrained` of the
pipeline class that `model_index.json` names: `StableDiffusionPipeline` (SD 1.x and 2.x) or
`StableDiffusionXLPipeline` (SDXL); family.py tells the families apart.
Weights are read from .safetensors only (`use_safetensors=True`): a pickled `.bin`/`.ckpt` can run
code when loaded, so it is refused unless the caller trusts the folder (`allow_pickle=True`, the
`--allow-pickle` flag, or `DT_LORA_ALLOW_PICKLE=1` for any command).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from dt_lora.errors import UnsafeWeights, UserError

TOY = "toy"
TOY_SDXL = "toy-sdxl"  # the toy world's SDXL-architecture pipeline
CANVAS = "canvas"  # 100 named characters, artists' styles and look-alikes (dt_lora.canvas)
ALLOW_PICKLE_ENV = "DT_LORA_ALLOW_PICKLE"
ALLOW_PICKLE_FLAG = "--allow-pickle"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class BaseModelNotFound(UserError, FileNotFoundError):
    """The base model could not be found locally (and, offline, could not be fetched)."""


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """`allow_pickle` if given, else whether the environment variable DT_LORA_ALLOW_PICKLE is set to 1/true/yes."""
    if allow_pickle is not None:
        return bool(allow_pickle)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _unsafe_weights_message(where: str) -> str:
    return (f"{where}; dt-lora loads .safetensors weights only, because loading a pickle can run arbitrary code. "
            f"If you trust this model, pass {ALLOW_PICKLE_FLAG} (or set {ALLOW_PICKLE_ENV}=1; in Python "
            "allow_pickle=True), or convert it once with save_pretrained(..., safe_serialization=True)")


def _model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"base model folder {folder}: cannot read model_index.json ({error})") from None
    if not isinstance(index, dict):
        raise UserError(f"base model folder {folder}: model_index.json is not a JSON object")
    return index


def _refuse_pickle_only_components(folder: Path, index: dict) -> None:
    """Raise `UnsafeWeights` if a component of the pipeline `folder` has pickled weights and no safetensors."""
    for name, entry in index.items():
        component = folder / name
        if not (isinstance(entry, list) and entry and entry[0] and component.is_dir()):
            continue
        files = [f for f in component.iterdir() if f.is_file()]
        pickled = sorted(f.name for f in files if f.suffix.lower() in _PICKLE_SUFFIXES)
        if pickled and not any(f.name.endswith(".safetensors") for f in files):
            raise UnsafeWeights(_unsafe_weights_message(
                f"base model folder {folder}: component {name} has pickled weights only ({name}/{pickled[0]})"))


def describe(base: str | os.PathLike) -> str:
    """A stable identifier for metadata: 'toy', a resolved local path, or the Hub id."""
    base = str(base)
    if base in EMBEDDED_WORLDS:
        return base
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


# model_index.json's `_class_name` → what dt-lora loads it as (the SDXL img2img/inpaint folders hold the
# same components; diffusers loads them into the text-to-image class)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLPipeline",
}


def pipeline_class_for(class_name: object, where: str):
    """The diffusers pipeline class for a model_index.json `_class_name`; a one-line error for any other."""
    import diffusers

    if class_name not in PIPELINE_CLASSES:
        raise UserError(f"{where}: model_index.json names {class_name!r}; dt-lora shields Stable Diffusion 1.x, "
                        "2.x and SDXL pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)")
    return getattr(diffusers, PIPELINE_CLASSES[class_name])


def _pipeline_kwargs(pipeline_class) -> dict:
    """SD 1.x/2.x folders may name a safety checker; dt-lora never loads one (SDXL has none)."""
    return {"safety_checker": None} if pipeline_class.__name__ == "StableDiffusionPipeline" else {}


# The worlds that ship inside the package (dt_lora.toy, dt_lora.canvas): their pipeline folders, by --base
# name. Named by path, not imported: the worlds' own code sits above this module.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_WORLDS = {
    TOY: _PACKAGE_DIR / "toy" / "model",
    TOY_SDXL: _PACKAGE_DIR / "toy" / "model_sdxl",
    CANVAS: _PACKAGE_DIR / "canvas" / "model",
}


def load_embedded(folder: str | os.PathLike, *, device: str = "cpu", dtype=None):
    """An embedded world's pipeline from its folder (`EMBEDDED_WORLDS`), offline through the ordinary
    diffusers path; shipped in float16 to stay small, computed in `dtype` (float32 by default)."""
    import torch

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        world = folder.parent.name  # toy or canvas: the package folder that holds the model
        raise BaseModelNotFound(f"embedded model not found at {folder}: reinstall dt-lora, or rebuild it "
                                f"from a checkout with `python -m worlds.{world}.build --out {folder}`")
    pipeline_class = pipeline_class_for(_model_index(folder).get("_class_name"), f"embedded model folder {folder}")
    pipeline = pipeline_class.from_pretrained(folder, dtype=dtype or torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_pipeline(base: str | os.PathLike = TOY, *, device: str = "cpu", dtype=None,
                  allow_pickle: bool | None = None):
    """A `StableDiffusionPipeline` or `StableDiffusionXLPipeline` for `base`, in `dtype` (float32 by
    default) on `device`.

    Only .safetensors weights are loaded unless `allow_pickle` (default: `DT_LORA_ALLOW_PICKLE`).
    """
    import torch

    base = str(base)
    dtype = dtype or torch.float32
    if base in EMBEDDED_WORLDS:
        return load_embedded(EMBEDDED_WORLDS[base], device=device, dtype=dtype)

    path = Path(base).expanduser()
    looks_local = path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local:
        if not (path / "model_index.json").is_file():
            raise BaseModelNotFound(
                f"base model folder {path} is not a diffusers pipeline: {path / 'model_index.json'} "
                "is missing. Pass a folder saved with `save_pretrained` (or `dt-lora bake --format diffusers`)."
            )
        index = _model_index(path)
        if not pickle_allowed(allow_pickle):
            _refuse_pickle_only_components(path, index)
        pipeline_class = pipeline_class_for(index.get("_class_name"), f"base model folder {path}")
        try:
            pipeline = pipeline_class.from_pretrained(path, dtype=dtype, use_safetensors=_use_safetensors(allow_pickle),
                                                      **_pipeline_kwargs(pipeline_class))
        except (OSError, ValueError) as error:  # a component or weight file missing, in diffusers' words
            raise BaseModelNotFound(f"base model folder {path}: {str(error).splitlines()[0]}") from None
    else:
        pipeline = _from_hub(base, dtype, allow_pickle)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _use_safetensors(allow_pickle: bool | None) -> bool | None:
    """diffusers' `use_safetensors`: True (safetensors or fail), or None (prefer them) when pickle is allowed."""
    return None if pickle_allowed(allow_pickle) else True


def _from_hub(model_id: str, dtype, allow_pickle: bool | None = None):
    """Load a Hub id from the local cache; fetch it only when the Hub is reachable and allowed."""
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    errors = []
    for local_only in (True,) if offline else (True, False):
        try:
            index = DiffusionPipeline.load_config(model_id, local_files_only=local_only)
            pipeline_class = pipeline_class_for(index.get("_class_name"), f"base model {model_id!r}")
            return pipeline_class.from_pretrained(
                model_id, dtype=dtype, local_files_only=local_only, use_safetensors=_use_safetensors(allow_pickle),
                **_pipeline_kwargs(pipeline_class))
        except (OSError, ValueError) as error:  # diffusers reports a missing repo or file as either
            errors.append(error)
    hint = ""
    if not pickle_allowed(allow_pickle) and "safetensors" in str(errors[-1]):
        hint = (f" If the model has pickled weights only, dt-lora loads them only when you trust it: "
                f"pass {ALLOW_PICKLE_FLAG} (or set {ALLOW_PICKLE_ENV}=1).")
    raise BaseModelNotFound(
        f"base model {model_id!r} is not in the local Hugging Face cache"
        + (" and HF_HUB_OFFLINE is set" if offline else " and could not be downloaded")
        + f" ({type(errors[-1]).__name__}: {str(errors[-1]).splitlines()[0]}). Download the pipeline "
        "where the Hub is reachable and pass its local folder instead, e.g. --base /models/sd15, "
        "or use --base toy." + hint
    ) from None


def unet_fingerprint(unet) -> str:
    """SHA-256 (first 16 hex digits) of the UNet's weights: which base an adapter was trained on."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        if ".lora_" in name:  # an attached adapter is not part of the base
            continue
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def diffusers_errors_only():
    """Silence diffusers' warnings that do not apply to what dt-lora does (see the callers)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
