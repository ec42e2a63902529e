"""Image-quality metrics for real models: FID and Inception Score (torch-fidelity) and CLIP score.

Every weight file comes from a local path, and only as safetensors: nothing is downloaded and nothing
is unpickled. The standard FID Inception weights (inception-2015-12-05, sha256 6726825d...: the
weights-inception-*.pth that torch-fidelity and torchmetrics download, pytorch-fid's pt_inception-*.pth)
are published only as a pickle, so convert them once, on a machine where you trust that download:

    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # downloads the official file
    save_file(inception.state_dict(), "inception-2015-12-05.safetensors")

(With the .pth already on disk, `save_file(torch.load(PTH, weights_only=True), OUT)` does the same.)

CLIP score needs a local transformers CLIP folder (config.json, model.safetensors, tokenizer and
preprocessor files), e.g. openai/clip-vit-large-patch14 as `hf download` leaves it.

FID and IS follow torch-fidelity's defaults (TF1-compatible resize to 299, pool features for FID,
unbiased logits and 10 splits for IS), so the numbers compare with published ones. CLIP score is
torchmetrics' definition, max(100 * mean cosine(image, caption), 0); torchmetrics 1.9's CLIPScore
itself fails on transformers 5 (torchmetrics issue 3407), so it is computed here from CLIPModel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dt_lora.errors import UserError

METRICS = ("fid", "is", "clip")

_INCEPTION_HINT = (
    "pass --inception-weights PATH.safetensors, the standard FID Inception weights converted once "
    "from pt_inception-2015-12-05 as `python -m pydoc dt_lora.evaluate.metrics` shows"
)
_CLIP_HINT = (
    "pass --clip PATH, a local transformers CLIP folder with config.json, model.safetensors and the "
    "tokenizer/preprocessor files (e.g. openai/clip-vit-large-patch14)"
)


class MissingWeights(UserError, FileNotFoundError):
    """Weights a requested metric needs are not given, not there, not safetensors, or not that model's."""


class CaptionsError(UserError, ValueError):
    """A captions file could not be read as one caption per line or as COCO captions JSON."""


# ---------------------------------------------------------------- captions


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions, in file order, from a text file (one per line) or a COCO captions_*.json.

    A COCO file lists about five captions per image; all are returned in the file's order, so that
    `captions[:n]` is a reproducible prompt set. Blank lines and surrounding whitespace are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CaptionsError(f"captions file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix.lower() == ".json":
        captions = _coco_captions(path, text)
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise CaptionsError(f"captions file {path} holds no captions")
    return captions


def _coco_captions(path: Path, text: str) -> list[str]:
    expected = 'expected COCO captions JSON: {"annotations": [{"caption": "..."}, ...]}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CaptionsError(f"captions file {path} is not valid JSON ({error.msg} at line {error.lineno}, "
                            f"column {error.colno}); {expected}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise CaptionsError(f"captions file {path} has no 'annotations' list; {expected}")
    captions = []
    for index, annotation in enumerate(annotations):
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if not isinstance(caption, str):
            raise CaptionsError(f"captions file {path}: annotations[{index}] has no 'caption' string; {expected}")
        if caption.strip():
            captions.append(caption.strip())
    return captions


# ---------------------------------------------------------------- weights


def _safetensors_file(path, what: str, hint: str) -> Path:
    """`path` if it is a readable safetensors file; MissingWeights saying what is wrong otherwise."""
    if path is None:
        raise MissingWeights(f"{what} needs weights: {hint}")
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeights(f"{what} weights {path} do not exist: {hint}")
    if not path.is_file():
        raise MissingWeights(f"{what} weights {path} are a folder, not a .safetensors file: {hint}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):  # reads the JSON header only
            return path
    except SafetensorError as error:
        reason = f"not a safetensors file ({error})"
    with open(path, "rb") as f:
        if f.read(4).startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a bare pickle
            reason = "a PyTorch pickle, not safetensors, and dt-lora never unpickles weight files"
    raise MissingWeights(f"{what} weights {path} are {reason}: {hint}")


def load_inception(weights: str | os.PathLike | None, features: Sequence[str] = ("2048", "logits_unbiased"),
                   *, device: str = "cpu"):
    """torch-fidelity's FID Inception (FeatureExtractorInceptionV3) with weights from a safetensors file.

    The extractor's constructor either downloads its weights or `torch.load`s its weights path; it
    is handed an in-memory checkpoint re-serialised here from the safetensors tensors, so what it
    unpickles is only what this function just wrote, never the user's file.
    """
    import io

    import torch
    from safetensors.torch import load_file

    path = _safetensors_file(weights, "Inception (FID/IS)", _INCEPTION_HINT)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ModuleNotFoundError(
            "FID and IS need torch-fidelity: pip install 'dt-lora[metrics]' (or torch-fidelity)"
        ) from None
    checkpoint = io.BytesIO()
    torch.save(load_file(path), checkpoint)
    checkpoint.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", list(features), feature_extractor_weights_path=checkpoint
        )
    except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
        detail = " ".join(str(error).split())
        raise MissingWeights(
            f"Inception (FID/IS) weights {path} are not the FID Inception's state dict "
            f"({detail[:300]}{'...' if len(detail) > 300 else ''}): {_INCEPTION_HINT}"
        ) from None
    return extractor.to(device)


def _clip_folder(folder) -> Path:
    """`folder` if it looks like a full CLIP model saved as safetensors; MissingWeights otherwise."""
    if folder is None:
        raise MissingWeights(f"CLIP score needs a local CLIP model: {_CLIP_HINT}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingWeights(f"CLIP model folder {folder} does not exist or is not a folder: {_CLIP_HINT}")
    config = folder / "config.json"
    if not config.is_file():
        raise MissingWeights(f"CLIP model folder {folder} has no config.json: {_CLIP_HINT}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        raise MissingWeights(f"{config} is not a transformers config (JSON object): {_CLIP_HINT}") from None
    if model_type != "clip":
        raise MissingWeights(
            f"CLIP model folder {folder} holds a {model_type!r} model, not a full CLIP model "
            f"(text and vision towers): {_CLIP_HINT}"
        )
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise MissingWeights(
            f"CLIP model folder {folder} has no .safetensors weights"
            + (f" (only {', '.join(pickled)}, a pickle dt-lora will not load)" if pickled else "")
            + f": {_CLIP_HINT}; re-save a trusted copy with save_pretrained to get model.safetensors"
        )
    return folder


def load_clip(folder: str | os.PathLike | None, *, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder, safetensors weights only, nothing downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    folder = _clip_folder(folder)
    try:
        model, info = CLIPModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:  # transformers reports a missing or bad file as either
        raise MissingWeights(
            f"CLIP model folder {folder} could not be loaded ({str(error).splitlines()[0]}): {_CLIP_HINT}"
        ) from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise MissingWeights(
            f"CLIP model folder {folder} lacks {len(missing)} weights (e.g. {', '.join(missing[:3])}): {_CLIP_HINT}"
        )
    return model.to(device).eval(), processor


# ---------------------------------------------------------------- metrics


def quality_metrics(
    images: np.ndarray,
    captions: Sequence[str] | None = None,
    *,
    metrics: Iterable[str] = METRICS,
    reference_images: np.ndarray | str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    clip_model: str | os.PathLike | None = None,
    is_splits: int = 10,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """The requested `metrics` of generated uint8 NHWC `images`.

    - "fid": against `reference_images` (uint8 NHWC, or a folder of PNG/JPEG files, each
      centre-cropped and resized to the generated size as is usual for text-to-image FID).
    - "is": Inception Score over `is_splits` splits; also returns "is_std".
    - "clip": CLIP score of image i against `captions[i]` (one caption per image).

    Everything requested is checked before anything is computed: one MissingWeights lists every
    weight file that is missing, and bad arguments raise ValueError.
    """
    metrics = tuple(dict.fromkeys((metrics,) if isinstance(metrics, str) else metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}" if unknown
                         else "no metrics requested")
    _check_images(images, "images")
    n = len(images)
    if "fid" in metrics:
        if reference_images is None:
            raise ValueError("FID needs reference images (an image folder or a uint8 NHWC array)")
        if isinstance(reference_images, np.ndarray):
            _check_images(reference_images, "reference_images")
            references = len(reference_images)
        else:
            references = len(_reference_files(reference_images))
        if min(n, references) < 2:
            raise ValueError(f"FID needs at least 2 images on each side, got {n} generated and {references} reference")
    if "is" in metrics and not 1 <= is_splits <= n:
        raise ValueError(f"IS with {is_splits} splits needs at least {is_splits} images, got {n}")
    if "clip" in metrics and (captions is None or len(captions) != n):
        raise ValueError(f"CLIP score needs one caption per image: {n} images, "
                         f"{'no' if captions is None else len(captions)} captions")

    check_weights(metrics, inception_weights=inception_weights, clip_model=clip_model)

    results: dict[str, float] = {}
    if {"fid", "is"} & set(metrics):
        results.update(_inception_metrics(images, metrics, reference_images, inception_weights,
                                          is_splits, batch_size, device, progress))
    if "clip" in metrics:
        results["clip"] = _clip_score(images, list(captions), clip_model, batch_size, device, progress)
    return results


def check_weights(metrics: Iterable[str], *, inception_weights=None, clip_model=None) -> None:
    """Raise one MissingWeights naming every weight file that `metrics` need and that is missing."""
    problems = []
    if {"fid", "is"} & set(metrics):
        try:
            _safetensors_file(inception_weights, "Inception (FID/IS)", _INCEPTION_HINT)
        except MissingWeights as error:
            problems.append(str(error))
    if "clip" in metrics:
        try:
            _clip_folder(clip_model)
        except MissingWeights as error:
            problems.append(str(error))
    if problems:
        raise MissingWeights("\n".join(problems))


def _check_images(images, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        described = (f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray)
                     else type(images).__name__)
        raise ValueError(f"{name} must be a uint8 NHWC RGB array, got {described}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")


def _reference_files(folder) -> list[Path]:
    from dt_lora.scramble import list_images

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist or is not a folder")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no PNG or JPEG images found in reference folder {folder}")
    return files


def _batches(images, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _folder_batches(files: list[Path], size: tuple[int, int], batch_size: int) -> Iterator[np.ndarray]:
    """Reference images as uint8 NHWC batches, centre-cropped and resized to `size` (width, height).

    Each file is read by `dt_lora.images.read_rgb` (any mode and bit depth to 8-bit RGB, upright,
    transparency on white); one it cannot read is an `ImageReadError` naming it."""
    from PIL import Image, ImageOps

    from dt_lora.images import read_rgb

    for start in range(0, len(files), batch_size):
        batch = [np.asarray(ImageOps.fit(Image.fromarray(read_rgb(path)), size, Image.Resampling.BICUBIC))
                 for path in files[start:start + batch_size]]
        yield np.stack(batch)


def _features(extractor, batches: Iterable[np.ndarray], total: int, device: str, progress: bool, desc: str):
    """Each of the extractor's features, concatenated over all images, on the CPU."""
    import torch
    from tqdm.auto import tqdm

    chunks = []
    with torch.inference_mode(), tqdm(total=total, desc=desc, disable=not progress) as bar:
        for batch in batches:
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
            chunks.append([f.cpu() for f in extractor(pixels)])
            bar.update(len(batch))
    return [torch.cat(parts) for parts in zip(*chunks)]


def _inception_metrics(images, metrics, reference_images, weights, is_splits, batch_size, device, progress):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    layers = ["2048"] + (["logits_unbiased"] if "is" in metrics else [])
    extractor = load_inception(weights, layers, device=device)
    generated = _features(extractor, _batches(images, batch_size), len(images), device, progress, "inception")
    results = {}
    if "fid" in metrics:
        if isinstance(reference_images, np.ndarray):
            batches, total = _batches(reference_images, batch_size), len(reference_images)
        else:
            files = _reference_files(reference_images)
            batches, total = _folder_batches(files, (images.shape[2], images.shape[1]), batch_size), len(files)
        reference = _features(extractor, batches, total, device, progress, "inception (reference)")
        fid = fid_statistics_to_metric(fid_features_to_statistics(generated[0]),
                                       fid_features_to_statistics(reference[0]), verbose=False)
        results["fid"] = float(fid["frechet_inception_distance"])
    if "is" in metrics:
        score = isc_features_to_metric(generated[1], splits=is_splits)
        results["is"] = float(score["inception_score_mean"])
        results["is_std"] = float(score["inception_score_std"])
    return results


def _clip_score(images, captions: list[str], folder, batch_size: int, device: str, progress: bool) -> float:
    import torch
    from tqdm.auto import tqdm

    model, processor = load_clip(folder, device=device)
    max_length = model.config.text_config.max_position_embeddings
    total = 0.0
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc="clip", disable=not progress):
            inputs = processor(text=captions[start:start + batch_size], images=list(images[start:start + batch_size]),
                               return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            out = model(**{k: v.to(device) for k, v in inputs.items()})  # text/image embeds come L2-normalised
            total += (out.image_embeds * out.text_embeds).sum(-1).double().sum().item()
    return max(100.0 * total / len(images), 0.0)
