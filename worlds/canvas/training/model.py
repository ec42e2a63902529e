"""Build-time training of the canvas pipeline: tokenizer, VAE, and the denoiser (text encoder + UNet).

The denoiser is the long stage (hours on two cores), so it checkpoints every `CHECKPOINT_EVERY` steps
into out/build/denoiser and a re-run resumes from there. Every step's random draws come from
(seed, step) alone, so a resumed run trains exactly as an uninterrupted one would. The learning rate
is constant after its warm-up and the weights kept are an exponential moving average, so the model
at any checkpoint is finished, and a build can be taken further later by asking for more steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dt_lora.canvas import world
from dt_lora.io import atomic_write
from dt_lora.tensorfiles import write_safetensors
from worlds.canvas.training import architecture
from worlds.training import encode_dataset, train_world_vae, write_clip_bpe

CONTEXT_WORDS_FILE = "context_words.json"
ENGLISH_WORDS = 30_000  # wordfreq's most frequent English words: the tokenizer's corpus
CONTEXT_POOL = 6_000  # the most frequent of them that may appear around a prompt
CHECKPOINT_EVERY = 250
EMA_DECAY = 0.999
LEARNING_RATE = 6e-4
WARMUP = 300


def _english_words() -> list[tuple[str, float]]:
    """(word, Zipf frequency) of ordinary English, alphabetic words only."""
    from wordfreq import top_n_list, zipf_frequency

    return [(w, zipf_frequency(w, "en")) for w in top_n_list("en", ENGLISH_WORDS) if w.isalpha() and w.isascii()]


def build_tokenizer(out: Path) -> None:
    """A CLIP-format BPE over ordinary English (frequent words whole, rare ones in a few pieces) and the
    world's words, and the context words: English words that mean nothing in this world, split into
    those training may put around prompts and those kept for measuring only."""
    english = _english_words()
    # repeat words by frequency, so that BPE keeps the frequent ones whole
    corpus = [" ".join([w] * int(np.clip(10 ** ((z - 3) / 1.5), 1, 200))) for w, z in english]
    corpus += [" ".join(world.world_words() * 50)]
    must_be_whole = sorted(set(world.OBJECTS + world.COLOURS) | {"picture", "drawing", "image", "style", "character"})
    write_clip_bpe(out / "tokenizer", corpus, vocab_size=architecture.VOCAB_SIZE,
                   model_max_length=architecture.TOKENIZER_MAX_LENGTH, whole_words=must_be_whole)

    world_words = set(world.world_words()) | set(world.STYLES) | set(world.MARKS)
    neutral = [w for w, _ in english[:CONTEXT_POOL] if w not in world_words and len(w) > 2]
    # every fourth word is never shown in training: phrasings measured on them are held out
    context = {"train": [w for i, w in enumerate(neutral) if i % 4], "heldout": neutral[::4]}
    (out / CONTEXT_WORDS_FILE).write_text(json.dumps(context, indent=0))


def train_vae(out: Path, *, steps: int, batch_size: int, seed: int) -> None:
    train_world_vae(out, architecture.make_vae(), world, steps=steps, batch_size=batch_size, seed=seed)


# --- the denoiser -----------------------------------------------------------------------------------------

def _dataset(out: Path, vae, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[world.Scene]]:
    """The training set's latents (posterior mean and std) and scenes, encoded once and kept in out/build."""
    from safetensors.torch import load_file

    folder = out / "build"
    latents_file, scenes_file = folder / f"dataset-{size}-{seed}.safetensors", folder / f"dataset-{size}-{seed}.json"
    if not (latents_file.is_file() and scenes_file.is_file()):
        images, scenes = world.sample(size, seed, character_rate=0.4)
        mean, std = encode_dataset(vae, images)
        write_safetensors(latents_file, {"mean": mean, "std": std})
        with atomic_write(scenes_file, "w") as f:
            json.dump([{"look": s.look.__dict__, "character": s.character} for s in scenes], f)
    tensors = load_file(latents_file)
    scenes = [world.Scene(world.Look(**r["look"]), 0.0, (0.0, 0.0), 0.0, r["character"])
              for r in json.loads(scenes_file.read_text())]
    return tensors["mean"], tensors["std"], scenes


def _save_checkpoint(folder: Path, step: int, modules: dict, ema: dict, optimizer) -> None:
    """Everything a resumed run needs, written beside and then renamed over the previous checkpoint."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, partial / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in ema.items()}, partial / "ema.safetensors")
    state = {f"{index}.{key}": value for index, entries in optimizer.state_dict()["state"].items()
             for key, value in entries.items()}
    save_file(state, partial / "optimizer.safetensors")
    (partial / "state.json").write_text(json.dumps({"step": step}))
    previous = folder.with_name(folder.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def _load_checkpoint(folder: Path, modules: dict, ema: dict, optimizer) -> int:
    """Restore a checkpoint written by `_save_checkpoint`; returns its step (0 when there is none)."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return 0
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    ema.update(load_file(folder / "ema.safetensors"))
    saved = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in saved.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return json.loads((folder / "state.json").read_text())["step"]


def train_denoiser(out: Path, *, steps: int, batch_size: int, dataset_size: int, seed: int) -> None:
    """Train the text encoder and UNet together, resuming from out/build/denoiser if it is there."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    context_words = tuple(json.loads((out / CONTEXT_WORDS_FILE).read_text())["train"])
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()  # shipped in float16
    latent_mean, latent_std, scenes = _dataset(out, vae, dataset_size, seed + 1)
    scale = vae.config.scaling_factor

    modules = {
        "text_encoder": CLIPTextModel(architecture.canvas_text_encoder_config(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)),
        "unet": architecture.make_unet(),
    }
    parameters = {f"{m}.{k}": p for m, module in modules.items() for k, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=LEARNING_RATE, weight_decay=1e-2)
    ema = {k: p.detach().clone() for k, p in parameters.items()}
    checkpoint = out / "build" / "denoiser"
    start = _load_checkpoint(checkpoint, modules, ema, optimizer)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in architecture.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})

    progress = tqdm(range(start, steps), desc="canvas denoiser", initial=start, total=steps)
    for step in progress:
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(0, len(latent_mean), batch_size))
        noise = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * torch.randn(noise.shape, generator=generator)) * scale
        # 10% empty prompts teach the unconditional branch that classifier-free guidance needs
        prompts = ["" if rng.random() < 0.1 else world.training_prompt(scenes[i], rng, context_words)
                   for i in index.tolist()]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = modules["unet"](noisy, timesteps, modules["text_encoder"](ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)

        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / WARMUP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, parameter in parameters.items():
                ema[key].lerp_(parameter.detach(), 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            _save_checkpoint(checkpoint, step + 1, modules, ema, optimizer)

    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(ema[key])
    for name, module in modules.items():
        module.save_pretrained(out / name)
