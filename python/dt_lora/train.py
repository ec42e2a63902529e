"""Degeneration-Tuning: train one concept's shield as a LoRA adapter on the UNet's attention layers.

    result = train_adapter(load_recipe("adapters/circle.toml"), out="circle.safetensors")

Read top to bottom: load the base, prepare (or reuse) the cached data, attach LoRA, then step:

    loss = mse(unet_lora(noisy scrambled target, t, target prompt), noise)          # degenerate
         + w · mse(unet_lora(noisy anchor, t, anchor prompt), unet_base(same inputs))  # preserve

The preservation term distils the frozen base model (the same UNet with the adapter switched off)
on the anchors' noisy latents. Training the anchors on the plain denoising loss instead lets the
shield leak into neighbouring concepts (see docs/method.md for the measurements).

Checkpoints (LoRA weights + optimizer state as safetensors, step as JSON) are written every
`train.checkpoint_every` steps and on Ctrl-C; the same call resumes from the newest one. The batch of
each step is drawn from a generator seeded by (seed, step, process), so a resumed run replays the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .adapters import AdapterFile, write_adapter
from .base import describe, load_pipeline, unet_fingerprint
from .data import prepare_data
from .io import atomic_write
from .locality import shield_directions
from .recipe import Recipe

WARMUP_STEPS = 20
ADAPTER_NAME = "dt_lora"  # the name the adapter has on the UNet while it trains


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    adapter: Path | None  # None when stopped early (stop_after)
    steps: int
    seconds: float
    final_loss: float
    resumed_from: int


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    peak, total = recipe.train.learning_rate, recipe.train.steps
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(name: str, parameters, lr: float):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise RuntimeError(
                f"train.optimizer = 'adamw8bit' needs bitsandbytes ({error}); install it or use --train-optimizer adamw"
            ) from None
        return bnb.optim.AdamW8bit(parameters, lr=lr, weight_decay=1e-2)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)


# --- checkpoints --------------------------------------------------------------------------------


CHECKPOINT = "checkpoint.safetensors"


def _save_checkpoint(folder: Path, step: int, lora_state: dict, optimizer, loss: float) -> None:
    """LoRA weights and optimizer state in one safetensors file; step and scalars in its metadata."""
    from safetensors.torch import save

    tensors = {f"lora.{k}": v.detach().float().cpu().contiguous() for k, v in lora_state.items()}
    state = optimizer.state_dict()
    scalars: dict = {}

    def flatten(prefix: str, value, scalar_node: dict, key: str) -> None:
        # optimizer state nests (bitsandbytes keeps a dict per parameter): tensors go to the
        # safetensors payload under a path key, everything else into the JSON metadata
        if isinstance(value, dict):
            node = scalar_node.setdefault(key, {})
            for k, v in value.items():
                flatten(f"{prefix}/{k}", v, node, k)
        elif torch.is_tensor(value):
            tensors[f"optim.{prefix}"] = value.detach().cpu().contiguous()
        else:
            scalar_node[key] = value

    for index, param_state in state["state"].items():
        flatten(str(index), param_state, scalars, str(index))
    # hyper-parameters may be 0-d tensors (e.g. a tensor lr); JSON keeps their values
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in state["param_groups"]]
    meta = {"step": step, "loss": loss, "scalars": scalars, "param_groups": groups}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / CHECKPOINT) as f:
        f.write(save(tensors, metadata={"dt_lora_checkpoint": json.dumps(meta)}))


def _load_checkpoint(folder: Path, optimizer) -> tuple[int, dict] | None:
    from safetensors import SafetensorError, safe_open

    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["dt_lora_checkpoint"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise RuntimeError(f"checkpoint {path} is damaged ({error}); delete it to start over") from None
    lora_state = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    optim_state: dict = {int(k): v for k, v in meta["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, *path = key[len("optim."):].split("/")
            node = optim_state.setdefault(int(index), {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
    return meta["step"], lora_state


def _write_samples(pipeline, recipe: Recipe, path: Path) -> None:
    """Four target and four anchor generations with the adapter as it is now: watch the shield form."""
    from PIL import Image

    from .generate import generate_images, image_grid

    prompts = (recipe.target_prompts[:4] + recipe.anchor_prompts[:4])[:8]
    images = generate_images(pipeline, prompts, seed=0, steps=recipe.sampling.steps, guidance=recipe.sampling.guidance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        Image.fromarray(image_grid(images, 4, scale=max(1, 128 // images.shape[1]))).save(f, format="PNG")


# --- training -----------------------------------------------------------------------------------


def train_adapter(
    recipe: Recipe,
    out: str | Path,
    *,
    cache_dir: str | Path = ".dt-lora-cache",
    work_dir: str | Path | None = None,
    pipeline=None,
    progress: bool = True,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `recipe`'s shield and write it to `out` (a .safetensors adapter).

    `work_dir` holds the checkpoints (default: `<out>.work`); it is removed after success.
    `stop_after` ends the run after that many steps with a checkpoint and no adapter, as an
    interruption would (tests use it to check that resuming is exact).
    """
    from accelerate import Accelerator
    from peft import LoraConfig

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    started = time.perf_counter()

    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    if pipeline is None:
        pipeline = load_pipeline(recipe.base, device=str(accelerator.device))
    unet = pipeline.unet
    fingerprint = unet_fingerprint(unet)
    directions = shield_directions(pipeline, recipe) if recipe.lora.text_local else None  # fails before generating
    data = prepare_data(pipeline, recipe, cache_dir, base_fingerprint=fingerprint,
                        progress=progress and accelerator.is_main_process)

    unet.requires_grad_(False)
    if getattr(unet, "peft_config", None) and ADAPTER_NAME in unet.peft_config:
        unet.delete_adapters(ADAPTER_NAME)
    lora_config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
                             target_modules=list(recipe.lora.targets), init_lora_weights="gaussian")
    torch.manual_seed(recipe.train.seed)  # the LoRA initialisation
    try:
        unet.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora.targets {recipe.lora.targets}: {error}") from None
    if directions is not None:
        _fix_lora_a(unet, directions)
    base_dtype = unet.dtype
    try:
        return _train(recipe, out, work, accelerator, pipeline, data, fingerprint, progress, stop_after, started)
    finally:
        # leave the caller's pipeline as it was: no adapter, original dtype, eval mode
        unet.delete_adapters(ADAPTER_NAME)
        if unet.dtype != base_dtype:
            unet.to(base_dtype)
        unet.disable_gradient_checkpointing()
        unet.eval()


def _fix_lora_a(unet, directions: torch.Tensor) -> None:
    """Set every lora_A to the text-local directions and freeze it: only lora_B trains (locality.py)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            weight = module.lora_A[ADAPTER_NAME].weight
            weight.data.copy_(directions.to(weight.device, weight.dtype))
            weight.requires_grad_(False)


def _train(recipe: Recipe, out: Path, work: Path, accelerator, pipeline, data, fingerprint: str,
           progress: bool, stop_after: int | None, started: float) -> TrainResult:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    unet = pipeline.unet
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    if accelerator.mixed_precision in ("fp16", "bf16"):
        # frozen base weights in half precision, trainable LoRA weights in float32 (as diffusers' scripts)
        unet.to(torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16)
        for p in lora_parameters:
            p.data = p.data.float()
    optimizer = make_optimizer(recipe.train.optimizer, lora_parameters, recipe.train.learning_rate)

    start_step = 0
    checkpoint = _load_checkpoint(work, optimizer)
    if checkpoint is not None:
        start_step, lora_state = checkpoint
        set_peft_model_state_dict(unet, lora_state, adapter_name=ADAPTER_NAME)
        if accelerator.is_main_process and progress:
            print(f"[dt-lora] resuming {recipe.name} from step {start_step} ({work})")

    unet, optimizer = accelerator.prepare(unet, optimizer)
    base_unet = accelerator.unwrap_model(unet)
    scheduler = pipeline.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
    num_timesteps = scheduler.config.num_train_timesteps
    device = accelerator.device
    target_latents, target_embeds = data.target_latents, data.target_embeds
    anchor_latents, anchor_embeds = data.anchor_latents, data.anchor_embeds
    use_anchors = recipe.train.preservation != "none" and len(anchor_latents) > 0
    batch = recipe.train.batch_size

    def noisy(latents: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
        a = alphas_cumprod[t.to(device)].view(-1, 1, 1, 1)
        latents, noise = latents.to(device), noise.to(device)
        return a.sqrt() * latents + (1 - a).sqrt() * noise, noise, t.to(device)

    def save_checkpoint(step: int, loss: float) -> None:
        if accelerator.is_main_process:
            _save_checkpoint(work, step, get_peft_model_state_dict(base_unet, adapter_name=ADAPTER_NAME),
                             optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, loss)

    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in base_unet.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_B]

    unet.train()
    loss_value, smoothed = float("nan"), None
    completed = start_step  # steps whose update is applied: what a checkpoint records
    end = recipe.train.steps if stop_after is None else min(recipe.train.steps, start_step + stop_after)
    bar = tqdm(range(start_step, end), initial=start_step, total=recipe.train.steps,
               desc=f"train {recipe.name}", disable=not (progress and accelerator.is_main_process))
    try:
        for step in bar:
            generator = torch.Generator().manual_seed(
                (recipe.train.seed * 1_000_003 + step) * 64 + accelerator.process_index)
            lr = _lr_at(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr

            index = torch.randint(0, len(target_latents), (batch,), generator=generator)
            x, noise, t = noisy(target_latents[index], generator)
            with accelerator.autocast():
                prediction = unet(x, t, target_embeds[index].to(device)).sample
            loss = F.mse_loss(prediction.float(), noise.float())

            if use_anchors:
                index = torch.randint(0, len(anchor_latents), (batch,), generator=generator)
                x, noise, t = noisy(anchor_latents[index], generator)
                embeds = anchor_embeds[index]
                unconditional = torch.rand(batch, generator=generator) < recipe.train.unconditional_share
                embeds = torch.where(unconditional.view(-1, 1, 1), data.unconditional_embed, embeds).to(device)
                with accelerator.autocast():
                    if recipe.train.preservation == "distill":
                        with torch.no_grad():
                            base_unet.disable_adapters()
                            reference = base_unet(x, t, embeds).sample.float()
                            base_unet.enable_adapters()
                    else:
                        reference = noise.float()
                    if recipe.train.anchor_scale_jitter:
                        # preserve the anchors at a random strength of the adapter, not only at 1 (see recipe.py)
                        strength = 1 + recipe.train.anchor_scale_jitter * float(torch.rand((), generator=generator))
                        for layer in lora_layers:
                            layer.set_scale(ADAPTER_NAME, strength)
                    prediction = unet(x, t, embeds).sample
                    if recipe.train.anchor_scale_jitter:
                        for layer in lora_layers:
                            layer.set_scale(ADAPTER_NAME, 1.0)
                loss = loss + recipe.train.preservation_weight * F.mse_loss(prediction.float(), reference)

            loss_value = loss.item()
            if not math.isfinite(loss_value) or (smoothed is not None and loss_value > 100 * max(smoothed, 1e-3)):
                raise TrainingDiverged(
                    f"loss became {loss_value:.4g} at step {step} (lr {lr:.3g}); lower --train-learning-rate. "
                    f"The last good checkpoint is kept in {work}")
            smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if completed % recipe.train.checkpoint_every == 0 and completed < recipe.train.steps:
                save_checkpoint(completed, loss_value)
            if recipe.train.sample_every and completed % recipe.train.sample_every == 0 and accelerator.is_main_process:
                unet.eval()
                _write_samples(pipeline, recipe, work / "samples" / f"step-{completed:06d}.png")
                unet.train()
    except KeyboardInterrupt:
        save_checkpoint(completed, loss_value)
        raise
    finally:
        bar.close()

    if completed < recipe.train.steps:  # stopped early on purpose: leave a checkpoint to resume from
        save_checkpoint(completed, loss_value)
        return TrainResult(None, completed, time.perf_counter() - started, loss_value, start_step)

    lora_state = get_peft_model_state_dict(base_unet, adapter_name=ADAPTER_NAME)
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        write_adapter(out, AdapterFile.from_training(
            lora_state, recipe=recipe, base=describe(recipe.base), base_fingerprint=fingerprint,
            version=__version__, seconds=seconds))
        (work / CHECKPOINT).unlink(missing_ok=True)
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
    return TrainResult(out, recipe.train.steps, seconds, loss_value, start_step)
