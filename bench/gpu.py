"""GPU check: SD 1.5-size training, a whole `dt-lora train`, bake + generate, a toy shield, on CUDA.

Stages, each in a fresh Python process (so each peak is its own, and one failure does not stop the rest):

  unet-b1    LoRA training steps on SD 1.5's UNet (random weights) at 512 px: fp16 autocast, bitsandbytes
             AdamW8bit, gradient checkpointing, batch 1, 30 timed steps (`bench train`'s `measure`)
  unet-b4    the same with batch 4
  unet-sdxl  the same on SDXL's UNet at 1024 px (batch 1), its pooled embedding and size ids given with the
             random text states, as cached text-encoder outputs (goal: <= 10 GB, kohya's recommendation)
  build      a random-weight pipeline with SD 1.5's layout and sizes (UNet, VAE and CLIP text encoder
             from SD 1.5's configs, the toy world's tokenizer with 77 tokens), saved as a diffusers folder
  train      `dt-lora train adapters/sd15-style-vangogh.toml --base FOLDER` with reduced counts (8 target
             + 8 anchor images, 10 sampler steps, 30 training steps), in phases: load, data
             (generate, scramble, encode), train (steps, checkpoints, adapter write)
  bake       `dt-lora bake --dtype float16` of that adapter into the random base (CPU work)
  generate   the baked model loaded in float16 on the GPU draws four 512 px images
  attack     `dt-lora attack`'s discrete search against that adapter on the random base, in float32 as the
             command loads it: one target prompt, 8 coordinate-search steps (the default budget is 6 prompts
             × 32 steps), in phases: load, images (the base's images of the prompt and its neighbours), search
  toy        the toy world's red shield (adapters/toy-red.toml, full recipe) trained and evaluated on the GPU
  guard      the SD 1.5 recipe's context guard (`dt_lora.shield.guard`, the adapter's text-encoder part) trained on the
             random base's CLIP text encoder at 77 tokens: one round of 50 steps and one text attack of 8 steps
             per target prompt, timed apart; the default training (4 × 600 steps, 3 attack rounds of 32 steps)
             extrapolated from them

Memory per phase: `torch.cuda.max_memory_allocated()` (and `max_memory_reserved()`), reset at the start of
each phase; the CUDA context (a few hundred MiB) is not included. Times are wall-clock seconds. Prints a
markdown table and writes JSON to `--out` after every stage (so a run cut short still leaves its numbers).

CPU smoke run (every code path at tiny sizes, no GPU): `python -m bench gpu --tiny --device cpu`.

On a CUDA machine, from a checkout, after the ordinary install: `python -m bench gpu --out gpu.json`
(stages stop being started after --deadline, 480 s by default). A machine without network or build
tools runs it from a bundle: `python -m bench gpu --prepare .gpu` (the native extension for its Python
and the wheels it lacks, about 15 MB) and docs/gpu-check.md's command there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

from bench import load_note
from bench import train as train_bench
from dt_lora.recipes import recipe_path

GIB = 2**30
CHECKOUT = Path(__file__).resolve().parents[1]  # the source checkout, for --prepare (it builds the extension)
CONFIGS = CHECKOUT / "python" / "dt_lora" / "configs"
SD15_RECIPE = "sd15-style-vangogh"
TOY_RECIPE = "toy-red"
TEXT_TOKENS = 77  # SD 1.5's prompt length; the toy tokenizer's vocabulary, padded to it

# Reduced counts for the SD 1.5 recipe, so that the whole check stays far below 8 minutes on an H100;
# `--tiny` shrinks them further for the CPU smoke run.
FULL = {"unet_model": "sd15", "sdxl_model": "sdxl", "unet_steps": 30, "train_flags": {
    "target-images": 8, "anchors-images": 8, "sampling-steps": 10, "sampling-batch-size": 8,
    "train-steps": 30, "train-checkpoint-every": 10}, "generate_steps": 25,
    "attack": {"prompts": 1, "steps": 8}, "guard": {"guard.rounds": 1, "guard.steps": 50, "guard.attack_steps": 8},
    "toy_overrides": {}}
TINY = {"unet_model": "toy", "sdxl_model": "toy-sdxl", "unet_steps": 2, "train_flags": {
    "target-images": 4, "anchors-images": 4, "sampling-steps": 2, "sampling-batch-size": 4,
    "train-steps": 3, "train-checkpoint-every": 2}, "generate_steps": 2,
    "attack": {"prompts": 1, "steps": 1, "candidates": 2, "samples": 2, "concept_images": 1},
    "guard": {"guard.rounds": 1, "guard.steps": 2, "guard.attack_steps": 1, "guard.batch": 2}, "toy_overrides": {
    # fewer prompts to evaluate, drawn with the toy's own sampler, so that its base rates stay 1.00
    "target.images": 4, "anchors.images": 4, "train.steps": 2, "target.templates": ["a red {shape}"],
    "target.vars": {"shape": ["circle", "star"]}, "target.paraphrases": ["a picture showing a red circle"],
    "anchors.templates": ["a {colour} {shape}"], "anchors.vars": {"colour": ["green", "blue"], "shape": ["circle", "star"]}}}
GENERATE_PROMPTS = ["a wheat field in the style of Van Gogh", "a starry night by Claude Monet",
                    "a portrait by Rembrandt", "a village street, watercolour"]

# Width overrides that turn SD 1.5's configs into a tiny model with the same blocks, layers and key names
# (widths change where SD's do, so the same resnets get a conv_shortcut).
TINY_UNET = {"block_out_channels": [32, 64, 96, 96], "cross_attention_dim": 32, "norm_num_groups": 16,
             "sample_size": 8}
TINY_VAE = {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 16, "sample_size": 64}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32}

# SD 1.5's noise schedule (its scheduler_config.json), with DDIM as the toy world samples
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon"}

# The device's Python and what it lacks (KINDS.md): these wheels travel in the bundle.
DEVICE_PYTHON = "3.12"
BUNDLE_PACKAGES = ("diffusers", "peft", "bitsandbytes")
VERSIONS_SHOWN = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
                  "numpy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and counts: the CPU smoke run of every stage (needed on CPU)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the models, adapter and images here (default: a temporary folder, removed)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, from: {', '.join(STAGES)} (default: all; "
                             "train needs build, bake needs train, generate needs bake)")
    parser.add_argument("--deadline", type=float, default=480,
                        help="seconds after which no further stage is started (default: 480)")
    parser.add_argument("--stage-timeout", type=float, default=300,
                        help="seconds per stage before it is marked failed (default: 300)")
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                        help="instead of running: build the bundle the device machine needs into DIR (see above)")


# ---------------------------------------------------------------- the SD 1.5-layout pipeline


def _config(name: str, overrides: dict | None) -> dict:
    config = json.loads((CONFIGS / name).read_text())
    return {**config, **(overrides or {})}


def build_sd15_pipeline(*, tiny: bool = False, device: str = "cpu", seed: int = 0):
    """A `StableDiffusionPipeline` with SD 1.5's layout and random weights, in float32 on `device`.

    Full size: SD 1.5's UNet, VAE and CLIP text encoder configs (configs/sd15_*.json). No tokenizer can be
    downloaded, so it is the toy world's (624 tokens) with SD's prompt length of 77 tokens, and the text
    encoder's vocabulary fits it. `tiny`: the same blocks, layers and key names at toy widths.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dt_lora.toy import MODEL_DIR

    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer", model_max_length=TEXT_TOKENS)
    text_config = _config("sd15_text_encoder.json", TINY_TEXT if tiny else None)
    text_config.update(vocab_size=len(tokenizer), max_position_embeddings=TEXT_TOKENS,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    for key in ("architectures", "model_type"):
        text_config.pop(key, None)
    torch.manual_seed(seed)
    with torch.device(device):  # random init directly on the device: seconds instead of a minute on CPU
        unet = UNet2DConditionModel.from_config(_config("sd15_unet.json", TINY_UNET if tiny else None))
        vae = AutoencoderKL.from_config(_config("sd15_vae.json", TINY_VAE if tiny else None))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_sd15_pipeline(folder: Path, *, tiny: bool = False, device: str = "cpu") -> dict:
    """Build the random pipeline and save it (float16 safetensors, as SD checkpoints ship) to `folder`."""
    import torch

    pipeline = build_sd15_pipeline(tiny=tiny, device=device)
    params = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"parameters": params, "folder_bytes": size, "image_size": _image_size(pipeline)}


def _image_size(pipeline) -> int:
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


# ---------------------------------------------------------------- measuring phases inside one process


class Meter:
    """Wall time and CUDA peak memory of consecutive phases of one process."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.phases: list[dict] = []
        self.restart()

    def restart(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()  # so that "reserved" is this phase's, not cache left by the last
            self.torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def close(self, name: str, note: str = "") -> dict:
        """End the running phase as `name`, record it, and start the next one."""
        phase = {"name": name, "seconds": None, "peak_allocated_bytes": None, "peak_reserved_bytes": None,
                 "note": note}
        if self.cuda:
            self.torch.cuda.synchronize()
            phase["peak_allocated_bytes"] = self.torch.cuda.max_memory_allocated()
            phase["peak_reserved_bytes"] = self.torch.cuda.max_memory_reserved()
        phase["seconds"] = time.perf_counter() - self.started
        self.phases.append(phase)
        self.restart()
        return phase


@contextlib.contextmanager
def _phases_around(meter: Meter, module, name: str, *, before: tuple[str, str] | None = None,
                   after: tuple[str, str] | None = None):
    """While inside, `module.<name>` ends the meter's running phase as `before` (name, note) when it is
    called and as `after` when it returns: how a stage splits a command it runs whole into phases."""
    if not hasattr(module, name):
        raise RuntimeError(f"{module.__name__} no longer calls {name}: update the phase split in bench/gpu.py")
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if before:
            meter.close(*before)
        result = original(*args, **kwargs)
        if after:
            meter.close(*after)
        return result

    setattr(module, name, wrapped)
    try:
        yield
    finally:
        setattr(module, name, original)


def _cli(argv: list[str]) -> None:
    """Run `dt-lora ARGV` in this process; a non-zero exit raises with what it printed to stderr."""
    from dt_lora import cli

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"dt-lora {argv[0]} exited with {code}: {stderr.getvalue().strip()[-600:]}")


def _flags(flags: dict) -> list[str]:
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def stage_build(device: str, work: str, tiny: bool) -> dict:
    meter = Meter(device)
    details = save_sd15_pipeline(Path(work) / "sd15-random", tiny=tiny, device=device)
    meter.close("build + save", f"{details['folder_bytes'] / GIB:.2f} GiB float16 folder, "
                                f"{details['image_size']} px")
    return {"phases": meter.phases, "details": details}


def stage_train(device: str, work: str, tiny: bool, optimizer: str | None = None) -> dict:
    """`dt-lora train` of the SD 1.5 recipe on the random base; phases split where `train_adapter`
    calls `prepare_data` (before it: load + fingerprint; after it: training and the adapter write)."""
    import dt_lora.shield.train as training

    sizes = TINY if tiny else FULL
    work = Path(work)
    flags = dict(sizes["train_flags"])
    if not device.startswith("cuda"):
        flags["train-mixed-precision"] = "no"  # the recipe's fp16 autocast is for CUDA
    if optimizer:
        flags["train-optimizer"] = optimizer
    argv = ["train", str(recipe_path(SD15_RECIPE)), "--base", str(work / "sd15-random"),
            "-o", str(work / f"{SD15_RECIPE}.safetensors"), "--cache-dir", str(work / "cache"),
            "--overwrite", "-q", *_flags(flags)]
    meter = Meter(device)
    data = (f"{flags['target-images']} target + {flags['anchors-images']} anchor images, "
            f"{flags['sampling-steps']} sampler steps, scramble, VAE encode")
    with _phases_around(meter, training, "prepare_data", before=("train: load", "base from the folder, UNet fingerprint"),
                        after=("train: data", data)):
        _cli(argv)
    phase = meter.close("train: train", "")
    steps = flags["train-steps"]
    phase["note"] = f"{steps} steps ({steps / phase['seconds']:.2f}/s), checkpoints, adapter write"
    return {"phases": meter.phases, "details": {"argv": argv}}


def stage_bake(device: str, work: str, tiny: bool) -> dict:
    work = Path(work)
    meter = Meter(device)
    _cli(["bake", "--base", str(work / "sd15-random"), "--adapter", str(work / f"{SD15_RECIPE}.safetensors"),
          "-o", str(work / "sd15-baked"), "--dtype", "float16", "--overwrite"])
    meter.close("bake", "float16, on the CPU (as `dt-lora bake` runs)")
    return {"phases": meter.phases}


def stage_generate(device: str, work: str, tiny: bool) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from dt_lora.base import load_pipeline
    from dt_lora.base.generate import generate_images, image_grid

    work = Path(work)
    meter = Meter(device)
    dtype = torch.float16 if meter.cuda else torch.float32
    pipeline = load_pipeline(work / "sd15-baked", device=device, dtype=dtype)
    meter.close("generate: load", f"baked model, {str(dtype).removeprefix('torch.')}")
    steps = (TINY if tiny else FULL)["generate_steps"]
    images = generate_images(pipeline, GENERATE_PROMPTS, seed=0, steps=steps, guidance=7.5, batch_size=4)
    size = images.shape[1]
    meter.close("generate", f"{len(images)} images at {size} px, {steps} steps, batch 4")
    Image.fromarray(image_grid(images, 4, scale=1)).save(work / "generated.png")
    # random weights draw noise; what matters is that float16 did not turn it into NaN (black) or constants
    return {"phases": meter.phases, "details": {"shape": list(images.shape), "pixel_std": float(np.std(images)),
                                                "distinct_images": len({im.tobytes() for im in images})}}


def stage_attack(device: str, work: str, tiny: bool) -> dict:
    """The discrete attack's search (`dt_lora.search.find_prompts`, what `dt-lora attack` runs before drawing and
    scoring) against the trained adapter; phases split where it calls `search_inputs`."""
    from dt_lora import search
    from dt_lora.base import load_pipeline
    from dt_lora.recipe import load_recipe

    work = Path(work)
    sizes = TINY if tiny else FULL
    settings = search.AttackSettings(methods=("discrete",), **sizes["attack"])
    # the train stage's sampler steps: the attack draws its images as the recipe's data was drawn
    recipe = load_recipe(recipe_path(SD15_RECIPE), {"sampling.steps": sizes["train_flags"]["sampling-steps"]})
    meter = Meter(device)
    pipeline = load_pipeline(work / "sd15-random", device=device)
    meter.close("attack: load", "random base, float32 (as `dt-lora attack` loads it)")
    images = (f"the base's images: {settings.concept_images} of the prompt, as many of its neighbours, "
              f"{recipe.sampling.steps} sampler steps")
    with _phases_around(meter, search, "search_inputs", after=("attack: images", images)):
        found = search.find_prompts(pipeline, recipe, [work / f"{SD15_RECIPE}.safetensors"], settings)
    phase = meter.close("attack: search", "")
    per_step = phase["seconds"] / (settings.prompts * settings.steps)
    default = search.AttackSettings()
    phase["note"] = (f"{settings.steps} steps ({per_step:.2f} s each), {settings.candidates} candidates, "
                     f"{settings.samples} samples; {default.prompts} prompts × {default.steps} steps like these ≈ "
                     f"{per_step * default.prompts * default.steps / 60:.0f} min")
    return {"phases": meter.phases, "details": {"found": found, "seconds_per_step": per_step}}


def stage_guard(device: str, work: str, tiny: bool) -> dict:
    """`train_guard` of the SD 1.5 recipe on the random base; the text attacks between rounds timed apart
    from the optimiser steps, so that the default training's time can be extrapolated."""
    from dt_lora.base import load_pipeline
    from dt_lora.recipe import GuardConfig, load_recipe
    from dt_lora.shield import guard

    work = Path(work)
    recipe = load_recipe(recipe_path(SD15_RECIPE), (TINY if tiny else FULL)["guard"])
    meter = Meter(device)
    pipeline = load_pipeline(work / "sd15-random", device=device)
    meter.close("guard: load", "random base, float32")
    attacking, logged = [], []  # the first log line ends the setup (directions, prompts, vocabulary)
    original = guard.text_attack

    def timed_attack(*args, **kwargs):
        started = time.perf_counter()
        found = original(*args, **kwargs)
        attacking.append(time.perf_counter() - started)
        return found

    with mock.patch.object(guard, "text_attack", timed_attack):
        parts = guard.train_guard(pipeline, recipe, log=lambda line: logged.append(time.perf_counter()))
    training = time.perf_counter() - logged[0]
    phase = meter.close("guard: train", "")
    settings, default = recipe.guard, GuardConfig()
    step = (training - sum(attacking)) / ((settings.rounds + 1) * settings.steps)
    attack_step = sum(attacking) / (len(attacking) * settings.attack_steps)
    estimate = (phase["seconds"] - training + (default.rounds + 1) * default.steps * step
                + default.rounds * len(recipe.target_prompts) * default.attack_steps * attack_step)
    phase["note"] = (f"setup {phase['seconds'] - training:.1f} s, "
                     f"{(settings.rounds + 1) * settings.steps} steps ({step:.3f} s each, batch {settings.batch}), "
                     f"{len(attacking)} text attacks of {settings.attack_steps} steps ({attack_step:.3f} s each); "
                     f"the default guard ≈ {estimate / 60:.1f} min")
    return {"phases": meter.phases, "details": {"seconds_per_step": step, "seconds_per_attack_step": attack_step,
                                                "default_seconds_estimate": estimate,
                                                "layers": sum(len(p.weights) for p in parts.values()) // 2}}


def stage_toy(device: str, work: str, tiny: bool) -> dict:
    from dt_lora import toy
    from dt_lora.evaluate import ToyScorer, evaluate_shields
    from dt_lora.recipe import load_recipe
    from dt_lora.shield.train import train_adapter

    work = Path(work) / "toy"
    meter = Meter(device)
    pipeline = toy.load(device=device)
    recipe = load_recipe(recipe_path(TOY_RECIPE), (TINY if tiny else FULL)["toy_overrides"])
    adapter = work / f"{TOY_RECIPE}.safetensors"
    result = train_adapter(recipe, adapter, cache_dir=work / "cache", pipeline=pipeline, progress=False,
                           overwrite=True)
    meter.close("toy: train", f"{recipe.name}: {recipe.target.images} + {recipe.anchors.images} images, "
                              f"{result.steps} steps, batch {recipe.train.batch_size}")
    report = evaluate_shields(pipeline, [recipe], work / "report", adapters=[adapter], scorer=ToyScorer(),
                              progress=False)
    shield = report.shields[recipe.name]
    anchors = {condition: sum(v.values()) / len(v) if v else None
               for condition, v in shield["preservation"].items()}
    rates = {"target": shield["target"], "paraphrases": shield["paraphrases"], "anchors": anchors}

    def arrow(values: dict) -> str:
        return f"{values['base']:.2f} → {values['shielded']:.2f}"

    meter.close("toy: eval", f"red drawn {arrow(rates['target'])}, paraphrases {arrow(rates['paraphrases'])}, "
                             f"anchors {arrow(rates['anchors'])}")
    return {"phases": meter.phases, "details": {"rates": rates, "train_seconds": result.seconds,
                                                "final_loss": result.final_loss}}


STAGE_FUNCTIONS = {"build": stage_build, "train": stage_train, "bake": stage_bake, "generate": stage_generate,
                   "attack": stage_attack, "toy": stage_toy, "guard": stage_guard}  # guard last: past the deadline it is skipped, not the toy
STAGES = ("unet-b1", "unet-b4", "unet-sdxl", *STAGE_FUNCTIONS)
NEEDS = {"train": "build", "bake": "train", "generate": "bake", "attack": "train", "guard": "build"}


def run_stage(stage: str, **kwargs) -> dict:
    """Worker entry (in its own process): one stage; an error becomes a row with its traceback."""
    try:
        return {"stage": stage, **STAGE_FUNCTIONS[stage](**kwargs)}
    except BaseException as error:  # noqa: BLE001 - a failed stage is a row, not a crash
        return {"stage": stage, "error": f"{type(error).__name__}: {error}".strip(),
                "traceback": traceback.format_exc()[-3000:]}


# ---------------------------------------------------------------- the check


def _unet_row(stage: str, batch: int, device: str, tiny: bool, timeout: float, model_key: str = "unet_model") -> dict:
    sizes = TINY if tiny else FULL

    def run(optimizer: str) -> dict:
        config = dict(model=sizes[model_key], device=device, gradient_checkpointing=True, optimizer=optimizer,
                      steps=sizes["unet_steps"], warmup=1, rank=8, batch=batch)
        return train_bench.run_configuration(config, timeout=timeout)

    result = run("adamw8bit")
    fallback = None
    if "error" in result:  # still measure memory and speed, with torch's AdamW, and say so
        fallback = run("adamw")
    row = {"stage": stage, "unet": result}
    if fallback is not None:
        row["unet_fallback"] = fallback
    measured = fallback if fallback is not None and "error" not in fallback else result
    if "error" in measured:
        row["error"] = result["error"]
        return row
    what = (f"{measured['model']} UNet, {'fp16 autocast' if device.startswith('cuda') else 'float32'}, "
            f"{measured['optimizer']}, grad ckpt, batch {batch}")
    note = f"{measured['steps']} steps, {measured['steps_per_s']:.2f} steps/s, {what}"
    if measured is fallback:
        note += f" (AdamW8bit FAILED: {result['error'][:120]})"
    cuda = device.startswith("cuda")
    row["phases"] = [{"name": stage, "seconds": measured["seconds"],
                      "peak_allocated_bytes": measured["peak_bytes"] if cuda else None,
                      "peak_reserved_bytes": measured.get("peak_reserved_bytes"), "note": note}]
    return row


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "–"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| phase | wall s | peak allocated GiB | peak reserved GiB | what / result |",
             "|---|---|---|---|---|"]
    for row in rows:
        for phase in row.get("phases", []):
            lines.append(f"| {phase['name']} | {phase['seconds']:.1f} | {_gib(phase['peak_allocated_bytes'])} | "
                         f"{_gib(phase['peak_reserved_bytes'])} | {phase['note']} |")
        if "error" in row:
            reason = row["error"].splitlines()[0][:200].replace("|", "/")
            lines.append(f"| {row['stage']} | – | – | – | FAILED: {reason} |")
        elif "skipped" in row:
            lines.append(f"| {row['stage']} | – | – | – | skipped: {row['skipped']} |")
    return "\n".join(lines)


def _versions() -> dict:
    from importlib import metadata

    import torch

    found = {"python": sys.version.split()[0]}
    for name in VERSIONS_SHOWN:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    from dt_lora.io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    if args.prepare is not None:
        return prepare_bundle(args.prepare)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"gpu check: --device {device}, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if not cuda and not args.tiny:
        print("gpu check: no CUDA device; full sizes need a GPU (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"gpu check: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; never wait on a network there isn't

    started = time.perf_counter()
    payload = {"device": device, "gpu": torch.cuda.get_device_name(device) if cuda else None, "tiny": args.tiny,
               "versions": _versions(), "load": load_note(), "stages": []}
    print(f"gpu check on {payload['gpu'] or device}{' (tiny)' if args.tiny else ''}: "
          + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()), flush=True)
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="dt-lora-gpu-")
    work = args.work_dir or Path(temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    try:
        for stage in stages:
            elapsed = time.perf_counter() - started
            needed = NEEDS.get(stage)
            if elapsed > args.deadline:
                row = {"stage": stage, "skipped": f"past the {args.deadline:.0f} s deadline"}
            elif needed and needed not in done:
                row = {"stage": stage, "skipped": f"needs {needed}, which did not run or failed"}
            else:
                timeout = max(30.0, min(args.stage_timeout, args.deadline + 60 - elapsed))
                stage_started = time.perf_counter()
                if stage == "unet-sdxl":
                    row = _unet_row(stage, 1, device, args.tiny, timeout, model_key="sdxl_model")
                elif stage.startswith("unet-b"):
                    row = _unet_row(stage, int(stage.removeprefix("unet-b")), device, args.tiny, timeout)
                else:
                    spec = {"stage": stage, "device": device, "work": str(work), "tiny": args.tiny}
                    row = train_bench.run_configuration(spec, timeout=timeout, module="bench.gpu")
                    if stage == "train" and "error" in row and "bitsandbytes" in row.get("traceback", ""):
                        failed = row  # measure the rest with torch's AdamW, and keep the failure
                        row = train_bench.run_configuration({**spec, "optimizer": "adamw"}, timeout=timeout,
                                                            module="bench.gpu")
                        row["adamw8bit_failure"] = failed
                row["process_seconds"] = time.perf_counter() - stage_started
                if "error" not in row:
                    done.add(stage)
            payload["stages"].append(row)
            status = (f"FAILED: {row['error'].splitlines()[0][:200]}" if "error" in row
                      else f"skipped ({row['skipped']})" if "skipped" in row else f"{row['process_seconds']:.0f} s")
            print(f"  {stage}: {status}", flush=True)
            payload["total_seconds"] = time.perf_counter() - started
            _write_json(args.out, payload)
    finally:
        if temporary is not None:
            temporary.cleanup()

    rows = payload["stages"]
    unet_b1 = next((r.get("unet") for r in rows if r["stage"] == "unet-b1"), None)
    if unet_b1 is not None and not args.tiny:
        payload["goal"] = train_bench.target_line([unet_b1], device)
    unet_sdxl = next((r.get("unet") for r in rows if r["stage"] == "unet-sdxl"), None)
    if unet_sdxl is not None and not args.tiny:
        payload["sdxl_goal"] = train_bench.target_line([unet_sdxl], device, model="sdxl")
    _write_json(args.out, payload)
    print()
    print(markdown_table(rows))
    print()
    for goal in ("goal", "sdxl_goal"):
        if goal in payload:
            print(payload[goal])
    print(f"total {payload['total_seconds']:.0f} s; {load_note()}")
    failed = [r["stage"] for r in rows if "error" in r]
    if failed:
        print(f"FAILED stages: {', '.join(failed)} (tracebacks in the JSON)", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- the bundle for the device machine


def _device_python_here() -> tuple[str, str]:
    """A local interpreter of the device's Python version (to build the native extension against) and its
    extension suffix. pyenv's shim for it is on PATH even when that version is not selected: try each."""
    candidates = [shutil.which(f"python{DEVICE_PYTHON}"),
                  *map(str, sorted(Path.home().glob(f".pyenv/versions/{DEVICE_PYTHON}.*/bin/python{DEVICE_PYTHON}")))]
    for python in filter(None, candidates):
        found = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                               capture_output=True, text=True, check=False)
        if found.returncode == 0:
            return python, found.stdout.strip()
    raise FileNotFoundError(f"no working python{DEVICE_PYTHON} here to build the native extension for the device "
                            f"(e.g. `pyenv install {DEVICE_PYTHON}`)")


def _trim_bitsandbytes(wheel: Path) -> None:
    """Keep only the CUDA 13 and CPU kernels (the device's torch is built for CUDA 13): 43 MB → ~5 MB."""
    import zipfile

    def unwanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and not base.startswith(("libbitsandbytes_cuda13",
                                                                          "libbitsandbytes_cpu"))

    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if unwanted(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not unwanted(line.split(b",")[0].decode()))
            target.writestr(item, data)
    os.replace(trimmed, wheel)


def prepare_bundle(folder: Path) -> int:
    """Build into `folder` what the device machine lacks: the native extension for its Python, and wheels."""
    root = CHECKOUT
    if not (root / "Cargo.toml").is_file():
        print(f"gpu check --prepare: run it from a dt-lora checkout ({root} has no Cargo.toml)", file=sys.stderr)
        return 2
    try:
        return _prepare_bundle(folder, root)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"gpu check --prepare: {error}", file=sys.stderr)
        return 1


def _prepare_bundle(folder: Path, root: Path) -> int:
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    python, suffix = _device_python_here()
    target_dir = root / "target" / f"py{DEVICE_PYTHON}"
    print(f"building the native extension for {python} ({suffix}) in {target_dir} …", flush=True)
    subprocess.run(["cargo", "build", "--release", "--features", "python,pyo3/extension-module",
                    "--target-dir", str(target_dir)], cwd=root, check=True, env={**os.environ, "PYO3_PYTHON": python})
    shutil.copy2(target_dir / "release" / "lib_native.so", folder / f"_native{suffix}")

    for old in folder.glob("*.whl"):
        old.unlink()
    platforms = [item for n in (17, 24, 27, 28) for item in ("--platform", f"manylinux_2_{n}_x86_64")]
    pins = [f"{name}=={metadata.version(name)}" for name in BUNDLE_PACKAGES]  # the versions tested here
    print(f"downloading {', '.join(pins)} for Python {DEVICE_PYTHON} …", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder),
                    *pins], check=True)
    for wheel in folder.glob("bitsandbytes-*.whl"):
        _trim_bitsandbytes(wheel)
    files = sorted(folder.iterdir())
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"  {f.name}  {f.stat().st_size / 2**20:.1f} MiB")
    print(f"bundle {folder}: {total / 2**20:.1f} MiB (carry it; the command is in `python -m bench gpu --help`)")
    return 0


if __name__ == "__main__":
    worker = argparse.ArgumentParser(prog="python -m bench.gpu")
    worker.add_argument("--_worker", dest="spec", required=True, help=argparse.SUPPRESS)
    sys.exit(train_bench._worker(worker.parse_args().spec, function=run_stage))
