"""Base models: `toy` (the embedded toy world), a local diffusers folder, or a Hugging Face Hub id.

Every command that takes `--base` loads it here, through the ordinary diffusers `from_pretrained`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

TOY = "toy"


class BaseModelNotFound(FileNotFoundError):
    """The base model could not be found locally (and, offline, could not be fetched)."""


def describe(base: str | os.PathLike) -> str:
    """A stable identifier for metadata: 'toy', a resolved local path, or the Hub id."""
    base = str(base)
    if base == TOY:
        return TOY
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def load_pipeline(base: str | os.PathLike = TOY, *, device: str = "cpu", dtype=None):
    """A `StableDiffusionPipeline` for `base`, in `dtype` (float32 by default) on `device`."""
    import torch
    from diffusers import StableDiffusionPipeline

    base = str(base)
    dtype = dtype or torch.float32
    if base == TOY:
        from . import toy

        return toy.load(device=device, dtype=dtype)

    path = Path(base).expanduser()
    looks_local = path.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local:
        if not (path / "model_index.json").is_file():
            raise BaseModelNotFound(
                f"base model folder {path} is not a diffusers pipeline: {path / 'model_index.json'} "
                "is missing. Pass a folder saved with `save_pretrained` (or `dt-lora bake --format diffusers`)."
            )
        pipeline = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None)
    else:
        pipeline = _from_hub(base, dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _from_hub(model_id: str, dtype):
    """Load a Hub id from the local cache; fetch it only when the Hub is reachable and allowed."""
    from diffusers import StableDiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    errors = []
    for local_only in (True,) if offline else (True, False):
        try:
            return StableDiffusionPipeline.from_pretrained(
                model_id, dtype=dtype, safety_checker=None, local_files_only=local_only
            )
        except (OSError, ValueError) as error:  # diffusers reports a missing repo or file as either
            errors.append(error)
    raise BaseModelNotFound(
        f"base model {model_id!r} is not in the local Hugging Face cache"
        + (" and HF_HUB_OFFLINE is set" if offline else " and could not be downloaded")
        + f" ({type(errors[-1]).__name__}: {str(errors[-1]).splitlines()[0]}). Download the pipeline "
        "where the Hub is reachable and pass its local folder instead, e.g. --base /models/sd15, "
        "or use --base toy."
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
