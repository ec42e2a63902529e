"""Degeneration-Tuning: train one concept's shield as a LoRA adapter on the UNet's attention layers.

    result = train_adapter(load_recipe("adapters/circle.toml"), out="circle.safetensors")

`train_adapter` reads top to bottom: it claims the output, loads the base, checks the recipe against
it, reads the checkpoint to resume from (checkpoint.py), prepares (or reuses) the cached data, attaches
LoRA, and loops over the steps, each one's loss from losses.py. Shields are text-local by default
(locality.py); the context guard (guard.py) and adversarial rounds (adversarial.py) are options.

Only usable weights are kept: the LoRA weights are checked after every update, no checkpoint or
adapter is written with a NaN/inf or a blown-up weight, and a diverged run's checkpoint is removed
(`_diverged`). When the adapter cannot be written at the end, a checkpoint at the last step keeps the
trained weights, and the same command writes the adapter without training again.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from dt_lora import distributed
from dt_lora._version import __version__
from dt_lora.adapters import AdapterFile, pipeline_text_encoders, write_adapter
from dt_lora.base import describe, load_pipeline, unet_fingerprint
from dt_lora.base.family import (
    SDXL,
    Conditioning,
    encode_for_one_encoder,
    encode_prompts,
    family,
    image_size,
    label,
)
from dt_lora.data import ConceptData, data_key, generation_dtype, prepare_data
from dt_lora.errors import UserError
from dt_lora.io import atomic_write, claim_output, output_lock, remove_if_empty
from dt_lora.recipe import POOLED_TARGET, TARGET_SCALE_MIN, Recipe, RecipeError, load_recipe
from dt_lora.recipes import recipe_path
from dt_lora.shield.checkpoint import (
    WEIGHT_LIMIT,
    Checkpoint,
    CheckpointError,
    ResumeState,
    TrainingDiverged,
    run_identity,
    unusable_tensor,
)
from dt_lora.shield.locality import (
    describe_key_words,
    encode_direction_prompts,
    lone_word_responses,
    pooled_directions,
    prompts_in_context,
    shield_directions,
    weakest_target_strength,
)
from dt_lora.shield.losses import (
    ADAPTER_NAME,
    StepContext,
    accumulate_gradients,
    step_generator,
    update_uninterrupted,
)

WARMUP_STEPS = 20
GUARD_FILE = "guard.safetensors"  # in the work folder: the trained guard, until the adapter is written
class TrainedGuard(NamedTuple):
    parts: dict[str, AdapterFile]  # the adapter's text-encoder parts, by component name
    seconds: float  # its training time, recorded in the adapter beside the UNet part's


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


def optimizer_class(name: str) -> type:
    """The optimizer `train.optimizer` names; train_adapter asks before any work, so a missing
    bitsandbytes is reported at once and not after the data generation."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise RecipeError(
                f"train.optimizer = 'adamw8bit' needs bitsandbytes ({error}); install it or use --train-optimizer adamw"
            ) from None
        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def make_optimizer(name: str, parameters, lr: float):
    return optimizer_class(name)(parameters, lr=lr, weight_decay=1e-2)


# --- the LoRA scale -----------------------------------------------------------------------------


def _write_samples(pipeline, recipe: Recipe, path: Path) -> None:
    """Four target and four anchor generations with the adapter as it is now: watch the shield form."""
    from PIL import Image

    from dt_lora.base.generate import generate_images, image_grid

    prompts = (recipe.target_prompts[:4] + recipe.anchor_prompts[:4])[:8]
    images = generate_images(pipeline, prompts, seed=0, steps=recipe.sampling.steps, guidance=recipe.sampling.guidance)
    with atomic_write(path) as f:
        Image.fromarray(image_grid(images, 4, scale=max(1, 128 // images.shape[1]))).save(f, format="PNG")


# --- one step: its loss terms --------------------------------------------------------------------


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
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    optimizer_class(recipe.train.optimizer)
    with _claimed(out, work, overwrite):
        return _train_adapter(recipe, out, work, cache_dir, pipeline, progress, stop_after)


@contextmanager
def _claimed(out: Path, work: Path, overwrite: bool) -> Iterator[None]:
    """Hold the output and the work folder for the whole run (io.claim_output): a second run on either is
    refused while this one holds it, and an output in the way or in a place that cannot be written is
    refused before any work. Locks are per machine, so the main process alone takes them; every process
    learns whether it got them, so that none goes on to wait for a refused run."""
    refusal = None
    with ExitStack() as held:
        if distributed.is_main():
            try:
                held.enter_context(claim_output(out, overwrite, kind="adapter"))
                held.enter_context(output_lock(work))
            except UserError as error:
                refusal = error
        refused = any(distributed.gather([(distributed.state().process_index, refusal is not None)]))
        if refusal is not None:
            raise refusal
        if refused:
            raise UserError(f"{out}: refused by the main process (its message says why)")
        yield


def _train_adapter(recipe: Recipe, out: Path, work: Path, cache_dir, pipeline, progress: bool,
                   stop_after: int | None) -> TrainResult:
    from accelerate import Accelerator

    recipe_fingerprint = recipe.fingerprint()  # the recipe as written: training resolves some of its settings

    device = distributed.state().device
    if recipe.train.mixed_precision == "fp16" and device.type != "cuda":
        # float16 autocast is CUDA's: elsewhere the UNet would be cast to float16 and its float32 inputs refused
        if distributed.is_main():
            print(f"[dt-lora] note: train.mixed_precision = 'fp16' is for CUDA; training in float32 on {device}",
                  file=sys.stderr, flush=True)
        recipe = replace(recipe, train=replace(recipe.train, mixed_precision="no"))
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    stacked_with = [load_recipe(recipe_path(name)) for name in recipe.guard.stacked_with]  # a missing one fails now
    if recipe.guard.enabled:
        from dt_lora.shield.guard import check_stacked_with

        check_stacked_with(recipe, stacked_with)  # a path to the recipe itself, before the base loads
    if pipeline is None:
        pipeline = load_pipeline(recipe.base, device=str(accelerator.device))
    guard = _guard(recipe, stacked_with, pipeline, work, progress) if recipe.guard.enabled else None

    if recipe.train.adversarial_rounds:
        from dt_lora.shield.adversarial import train_adversarial

        def train_round(round_recipe: Recipe, round_out: Path, round_work: Path) -> TrainResult:
            return _train_single(round_recipe, round_out, round_work, accelerator, pipeline, cache_dir, progress,
                                 None, guard, recipe_fingerprint)

        result = train_adversarial(recipe, out, work, pipeline=pipeline, train_round=train_round, progress=progress)
    else:
        result = _train_single(recipe, out, work, accelerator, pipeline, cache_dir, progress, stop_after, guard,
                               recipe_fingerprint)
    if result.adapter is not None and distributed.is_main():  # the adapter holds the guard now
        (work / GUARD_FILE).unlink(missing_ok=True)
        remove_if_empty(work)
    return result


def _guard(recipe: Recipe, stacked_with: list[Recipe], pipeline, work: Path, progress: bool) -> TrainedGuard:
    """The recipe's context guard (guard.py), the adapter's text-encoder parts. It reads text alone, so it
    trains before the UNet; it waits in the work folder until the adapter is written, so that a run
    interrupted later does not train it again."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save

    from dt_lora.shield.guard import train_guard

    path = work / GUARD_FILE
    names = list(pipeline_text_encoders(pipeline))
    identity = json.dumps({"recipe": recipe.fingerprint("guard", "target", "anchors"), "base": describe(recipe.base),
                           "stacked_with": [other.fingerprint("target", "anchors") for other in stacked_with],
                           "parts": names})
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("identity") == identity and not unusable_tensor(
                        {k: f.get_tensor(k) for k in f.keys()}, WEIGHT_LIMIT):
                    configs = json.loads(metadata["lora_config"])
                    parts = {name: AdapterFile({k[len(name) + 1:]: f.get_tensor(k) for k in f.keys()
                                                if k.startswith(f"{name}.")}, configs[name]) for name in names}
                    return TrainedGuard(parts, float(metadata["seconds"]))
        except (SafetensorError, OSError, KeyError, ValueError):  # damaged: dt-lora's own file, trained again
            pass
    log = print if progress and distributed.is_main() else (lambda line: None)
    log(f"[dt-lora] training {recipe.name}'s context guard ({', '.join(names)}; {recipe.guard.rounds} rounds)")
    started = time.perf_counter()
    parts = train_guard(pipeline, recipe, stacked_with, log=lambda line: log(f"[dt-lora] guard {line}"))
    guard = TrainedGuard(parts, time.perf_counter() - started)
    tensors = {f"{name}.{key}": value for name, part in parts.items() for key, value in part.weights.items()}
    blown = unusable_tensor(tensors, WEIGHT_LIMIT)
    if blown:  # kept, it would be reused by every later run
        raise TrainingDiverged(f"{recipe.name}'s context guard diverged ({blown}); it is not kept: run the same "
                               f"command with --guard-learning-rate {recipe.guard.learning_rate / 10:g} "
                               f"(a tenth of {recipe.guard.learning_rate:g})")
    if distributed.is_main():
        work.mkdir(parents=True, exist_ok=True)
        configs = {name: part.lora_config for name, part in parts.items()}
        with atomic_write(path) as f:
            f.write(save(tensors, metadata={"identity": identity, "lora_config": json.dumps(configs),
                                            "seconds": str(guard.seconds)}))
    return guard


def _train_single(recipe: Recipe, out: Path, work: Path, accelerator, pipeline, cache_dir, progress: bool,
                  stop_after: int | None, guard: TrainedGuard | None, recipe_fingerprint: str) -> TrainResult:
    """One training run of `recipe` on `pipeline`: data, adapter, steps, file."""
    from peft import LoraConfig

    started = time.perf_counter()
    unet = pipeline.unet
    # everything that can be refused is refused here, before minutes of data generation
    recipe.validate_image_size(image_size(pipeline), unet.config.sample_size)
    warning = recipe.resolution_warning(image_size(pipeline), label(family(pipeline)))
    if recipe.train.split_encoders and family(pipeline) != SDXL:
        warning = (warning + "; " if warning else "") + (f"train.split_encoders applies to SDXL's two text encoders; "
                                                        f"this {label(family(pipeline))} base has one, so it is ignored")
    if warning and distributed.is_main():
        print(f"[dt-lora] warning: {warning}", file=sys.stderr, flush=True)
    fingerprint = unet_fingerprint(unet)
    checkpoint = Checkpoint(work, run_identity(recipe, fingerprint, data_key(
        recipe, fingerprint, generation=generation_dtype(pipeline, recipe)), distributed.processes()))
    resume = checkpoint.read()
    seen = set(distributed.gather([(distributed.state().process_index, resume.step if resume else 0)]))
    if len(seen) > 1:  # e.g. a work folder on one machine's local disk: the processes would not agree on a step
        raise CheckpointError(f"{checkpoint.path}: the processes see different checkpoints (steps "
                              f"{sorted(seen)}); the work folder (--out's folder) must be shared by all machines")
    directions = pooled = None  # pooled: SDXL's added embedding as a target, the pooled embedding's directions
    if recipe.lora.text_local:
        encoded = encode_direction_prompts(pipeline, recipe)
        directions = shield_directions(pipeline, recipe, encoded)
        if distributed.is_main():
            line, warnings = describe_key_words(recipe, lone_word_responses(pipeline, recipe, directions,
                                                                             encoded[0].embeds))
            print(f"[dt-lora] {line}", file=sys.stderr, flush=True)
            for warning in warnings:
                print(f"[dt-lora] warning: {warning}", file=sys.stderr, flush=True)
        if POOLED_TARGET in recipe.lora.targets and family(pipeline) == SDXL:
            pooled = pooled_directions(pipeline, recipe, unet.add_embedding.linear_1.in_features, encoded)
    if recipe.train.target_scale_min is None:  # "auto": per concept, from its directions (recipe.py)
        low = (weakest_target_strength(directions, encoded[0].embeds) if directions is not None
               else TARGET_SCALE_MIN)
        recipe = replace(recipe, train=replace(recipe.train, target_scale_min=low))
    if resume is not None and resume.step == recipe.train.steps:
        data = None  # trained to the end before the adapter could be written: nothing to train on
    else:
        data = _training_data(pipeline, recipe, cache_dir, fingerprint, progress and distributed.is_main())

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
        _fix_lora_a(unet, directions, pooled)
    base_dtype = unet.dtype
    try:
        return _train(recipe, out, checkpoint, resume, accelerator, pipeline, data, fingerprint, progress,
                      stop_after, started, guard, recipe_fingerprint)
    finally:
        # leave the caller's pipeline as it was: no adapter, original dtype, eval mode
        unet.delete_adapters(ADAPTER_NAME)
        if not getattr(unet, "peft_config", None):  # peft's emptied wrappers would rename the weights (base_layer)
            unet.unload_lora()
        if unet.dtype != base_dtype:
            unet.to(base_dtype)
        unet.disable_gradient_checkpointing()
        unet.eval()


def _training_data(pipeline, recipe: Recipe, cache_dir, fingerprint: str, progress: bool) -> ConceptData:
    """The cached (or generated) target and anchor latents, with the recipe's extra prompt sets."""
    data = prepare_data(pipeline, recipe, cache_dir, base_fingerprint=fingerprint, progress=progress)
    images = data.target_latents
    if recipe.train.prompt_contexts:  # the same scrambled images, also under their prompts in contexts
        data.target_prompts = Conditioning.cat([data.target_prompts,
                                                encode_prompts(pipeline, prompts_in_context(recipe, pipeline.tokenizer))])
        data.target_latents = torch.cat([data.target_latents] + [images] * recipe.train.prompt_contexts)
    if recipe.train.split_encoders and family(pipeline) == SDXL:  # … and under their prompts to one encoder alone
        prompts = [recipe.target_prompts[i % len(recipe.target_prompts)] for i in range(len(images))]  # as data.py
        data.target_prompts = Conditioning.cat([data.target_prompts, *(encode_for_one_encoder(pipeline, prompts, e)
                                                                       for e in (0, 1))])
        data.target_latents = torch.cat([data.target_latents, images, images])
    return data


def _fix_lora_a(unet, directions: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
    """Set every lora_A to the text-local directions and freeze it: only lora_B trains (locality.py).
    SDXL's added embedding (`recipe.POOLED_TARGET`) gets `pooled`, the directions of the pooled embedding."""
    from peft.tuners.lora import LoraLayer

    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            weight = module.lora_A[ADAPTER_NAME].weight
            fixed = pooled if name.endswith(POOLED_TARGET) else directions
            weight.data.copy_(fixed.to(weight.device, weight.dtype))
            weight.requires_grad_(False)


def _train(recipe: Recipe, out: Path, checkpoint: Checkpoint, resume: ResumeState | None, accelerator,
           pipeline, data: ConceptData | None, fingerprint: str, progress: bool, stop_after: int | None,
           started: float, guard: TrainedGuard | None, recipe_fingerprint: str) -> TrainResult:
    from peft.utils import get_peft_model_state_dict

    unet, optimizer, ctx = _prepare(recipe, checkpoint, resume, accelerator, pipeline, data, progress)
    start_step = resume.step if resume else 0

    def save_checkpoint(step: int, loss: float) -> None:
        if distributed.is_main():
            checkpoint.write(step, get_peft_model_state_dict(ctx.base_unet, adapter_name=ADAPTER_NAME),
                             optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, loss)

    end = recipe.train.steps if stop_after is None else min(recipe.train.steps, start_step + stop_after)
    try:
        completed, loss_value = _run_steps(ctx, unet, optimizer, accelerator, pipeline, checkpoint, save_checkpoint,
                                           start_step, end, resume.loss if resume else math.nan, progress)
        if completed < recipe.train.steps:  # stopped early on purpose: leave a checkpoint to resume from
            save_checkpoint(completed, loss_value)
            distributed.wait()
            return TrainResult(None, completed, time.perf_counter() - started, loss_value, start_step)

        seconds = time.perf_counter() - started
        if distributed.is_main():
            adapter = AdapterFile.from_training(
                get_peft_model_state_dict(ctx.base_unet, adapter_name=ADAPTER_NAME), recipe=recipe,
                base=describe(recipe.base), base_fingerprint=fingerprint, version=__version__, seconds=seconds,
                processes=distributed.processes(), family=family(pipeline),
                text_encoders=guard.parts if guard else None, guard_seconds=guard.seconds if guard else 0.0,
                recipe_fingerprint=recipe_fingerprint)
            _write_trained(adapter, out, checkpoint, lambda: save_checkpoint(recipe.train.steps, loss_value))
        distributed.wait()  # every process returns once the adapter is on disk
        return TrainResult(out, recipe.train.steps, seconds, loss_value, start_step)
    except TrainingDiverged as error:
        if distributed.is_main():
            checkpoint.remove()
        raise _diverged(error, recipe, checkpoint) from None


def _prepare(recipe: Recipe, checkpoint: Checkpoint, resume: ResumeState | None, accelerator, pipeline,
             data: ConceptData | None, progress: bool):
    """(unet, optimizer) as accelerate prepared them, resumed where `resume` says, and the step context."""
    from peft.tuners.lora import LoraLayer

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
    if resume is not None:
        checkpoint.restore(resume, unet, optimizer)
        if distributed.is_main() and progress:
            print(f"[dt-lora] resuming {recipe.name} from step {resume.step} ({checkpoint.folder})")
    if distributed.processes() > 1 and distributed.is_main():
        # data-parallel: every process draws its own batch and the gradients are averaged
        print(f"[dt-lora] {distributed.processes()} processes × batch {recipe.train.batch_size} = effective "
              f"batch {distributed.processes() * recipe.train.batch_size}; learning rate "
              f"{recipe.train.learning_rate:g} as the recipe sets it (not scaled)", flush=True)

    if distributed.processes() > 1:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    else:  # also a process training alone in a launched group (distributed.alone): no DistributedDataParallel
        unet = accelerator.prepare_model(unet, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)
    base_unet = accelerator.unwrap_model(unet)
    ctx = StepContext(
        recipe=recipe, unet=unet, base_unet=base_unet,
        lora_layers=[m for m in base_unet.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_B],
        data=data, scheduler=pipeline.scheduler, alphas_cumprod=pipeline.scheduler.alphas_cumprod.to(accelerator.device),
        num_timesteps=pipeline.scheduler.config.num_train_timesteps, device=accelerator.device,
        autocast=accelerator.autocast)
    return unet, optimizer, ctx


def _run_steps(ctx: StepContext, unet, optimizer, accelerator, pipeline, checkpoint: Checkpoint,
               save_checkpoint: Callable[[int, float], None], start_step: int, end: int, loss_value: float,
               progress: bool) -> tuple[int, float]:
    """Train steps start_step..end-1, checkpointing and sampling as the recipe says; returns (steps whose
    update is applied, last loss). Ctrl-C leaves a checkpoint of the applied steps; a divergence raises."""
    from tqdm.auto import tqdm

    recipe = ctx.recipe
    lora_parameters = {name: p for name, p in ctx.base_unet.named_parameters() if p.requires_grad}
    unet.train()
    smoothed, completed = None, start_step
    bar = tqdm(range(start_step, end), initial=start_step, total=recipe.train.steps,
               desc=f"train {recipe.name}", disable=not (progress and distributed.is_main()))
    try:
        for step in bar:
            generator = step_generator(recipe, step, distributed.state().process_index)
            lr = _lr_at(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_value = accumulate_gradients(ctx, accelerator, generator)
            if not math.isfinite(loss_value) or (smoothed is not None and loss_value > 100 * max(smoothed, 1e-3)):
                raise TrainingDiverged(f"loss became {loss_value:.4g} at step {step} (lr {lr:.3g})")
            smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
            with update_uninterrupted():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                completed = step + 1
            # The loss alone misses a blow-up: the UNet's normalisation layers scale a huge LoRA output
            # back down, so weights of 5e28 still give a finite loss for a step or more, and a checkpoint
            # written then would keep them. Checked after every update, not only at checkpoints, so a run
            # stops at the update that blew up instead of training on garbage until the next checkpoint;
            # it costs one device sync over the LoRA weights, little beside the step's own (loss.item()).
            blown = unusable_tensor(lora_parameters, WEIGHT_LIMIT)
            if blown:
                raise TrainingDiverged(f"the update of step {step} (lr {lr:.3g}) blew up the LoRA weights: {blown}")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if completed % recipe.train.checkpoint_every == 0 and completed < recipe.train.steps:
                save_checkpoint(completed, loss_value)
            if recipe.train.sample_every and completed % recipe.train.sample_every == 0 and distributed.is_main():
                unet.eval()
                _write_samples(pipeline, recipe, checkpoint.folder / "samples" / f"step-{completed:06d}.png")
                unet.train()
    except KeyboardInterrupt:
        save_checkpoint(completed, loss_value)
        raise
    finally:
        bar.close()
    return completed, loss_value


def _write_trained(adapter: AdapterFile, out: Path, checkpoint: Checkpoint,
                   save_final_checkpoint: Callable[[], None]) -> None:
    """Write the finished adapter to `out` and remove the run's checkpoint. When the write fails, the
    trained weights are kept as a last-step checkpoint, so the same command writes them without training."""
    blown = unusable_tensor({prefix + k: v for prefix, part in adapter.parts() for k, v in part.weights.items()},
                            WEIGHT_LIMIT)
    if blown:
        raise TrainingDiverged(f"{out}: not written, {blown}")
    try:
        write_adapter(out, adapter)
    except BaseException as error:  # a full disk, a folder made read-only, Ctrl-C: keep the work
        kept = _keep_trained(checkpoint, save_final_checkpoint)
        if isinstance(error, OSError):
            raise _not_written(error, out, kept) from None
        raise  # Ctrl-C: the same command resumes at the last step; anything else is a bug
    checkpoint.remove()


def _diverged(error: TrainingDiverged, recipe: Recipe, checkpoint: Checkpoint) -> TrainingDiverged:
    """The divergence, and a command that trains again. The run's checkpoint is removed: resumed, it would
    replay the same batches into the same divergence, and a run at another learning rate is another run
    (its identity) that would refuse it."""
    rate = recipe.train.learning_rate
    return TrainingDiverged(f"training diverged: {error}; no checkpoint of this run is kept in {checkpoint.folder} "
                            f"(resumed, it would diverge again): run the same command with --train-learning-rate "
                            f"{rate / 10:g} (a tenth of {rate:g})")


def _keep_trained(checkpoint: Checkpoint, save_final_checkpoint: Callable[[], None]) -> str:
    """Keep the trained weights in a checkpoint at the last step, from which the same command writes the
    adapter and trains no step again; returns what was kept, as a sentence for the error."""
    try:
        save_final_checkpoint()
    except Exception as error:  # the work folder is on the same full disk, or in the same read-only folder
        return f"the trained weights could not be kept either ({_os_problem(error)})"
    return (f"the trained weights are kept in {checkpoint.path}: run the same command again to write the "
            "adapter without training again")


def _not_written(error: OSError, out: Path, kept: str) -> OSError:
    """`error` from writing the adapter as one line naming the output, the error and where the work is
    kept; of the same class, so that the exit code keeps its meaning (a PermissionError is the user's,
    a full disk the machine's)."""
    failure = type(error)(f"{out}: the adapter could not be written ({_os_problem(error)}); {kept}")
    failure.errno = error.errno
    return failure


def _os_problem(error: BaseException) -> str:
    """The error's reason alone ("Permission denied"): the message names the path itself."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error).splitlines() or [type(error).__name__])[0]
