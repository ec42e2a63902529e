"""LoRA training steps per second and peak memory, toy UNet and SD 1.5's UNet (random weights).

Each row is one configuration: model x gradient checkpointing (off/on) x optimizer
(torch AdamW / bitsandbytes AdamW8bit, both built by `dt_lora.shield.train.make_optimizer`).
A step is what training does per batch: LoRA (r=8 by default, alpha=r, on to_q/to_k/to_v/to_out.0)
on a frozen UNet, random noisy latents + random timesteps + random text embeddings, forward, MSE
to random noise, backward, optimizer step, zero_grad. Warm-up steps are not timed.

Models:
  toy   the toy world's UNet (`dt_lora.toy.load().unet`), latents 4x8x8, text 1x16x64
  sd15  Stable Diffusion 1.5's UNet architecture (dt_lora/configs/sd15_unet.json), random
        weights, no download; latents 4x64x64 (512 px), text 1x77x768, batch 1

Data generation: `prepare_data` for the toy circle's recipe (--data-images target images, 25 sampler
steps, a fresh cache) with 1 and 2 processes (`--data-processes`), started as `dt-lora train` starts
under `accelerate launch`; the row's time is the data stage alone, from the first process's start of
`prepare_data` to the last shard on disk. On CPU the cores are shared out (OMP_NUM_THREADS = cores / N; or
--data-threads), so the speed-up is bounded by what splitting the same cores buys; on GPUs, each
process has its own.

Every configuration runs in a fresh subprocess, so its peak memory is its own.
CPU: float32; "peak" is the worker process's peak RSS (ru_maxrss: imports, model build and
steps), "before" its RSS just before the first step, "+step" = peak - before (the steps' own
extra memory; marked "<=" when the peak was already reached before the steps, i.e. the steps
needed at most that much). CUDA: base weights float16, LoRA weights float32, forward under
autocast(float16); "peak" is torch.cuda.max_memory_allocated() over the steps (CUDA context
and allocator cache not included; the JSON also has max_memory_reserved).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import load_note

MODELS = ("toy", "sd15", "sdxl", "toy-sdxl")
OPTIMIZERS = ("adamw", "adamw8bit")
SD15_CONFIG = Path(__file__).resolve().parents[1] / "python" / "dt_lora" / "configs" / "sd15_unet.json"
SDXL_CONFIG = SD15_CONFIG.with_name("sdxl_unet.json")
TARGET = "SD 1.5 LoRA training at 512 px in <= 6 GB GPU memory (fp16, 8-bit AdamW, gradient checkpointing)"
TARGET_BYTES = 6 * 2**30
# kohya's SDXL LoRA training: 8 GB minimum, 10 recommended
SDXL_TARGET = ("SDXL LoRA training at 1024 px in <= 10 GB GPU memory (fp16, 8-bit AdamW, gradient checkpointing, "
               "cached text outputs)")
SDXL_TARGET_BYTES = 10 * 2**30
GIB = 2**30
RESULT_TAG = "DT_LORA_BENCH_RESULT "  # the worker's one JSON line on stdout starts with this
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# latents (channels, height, width) and text embeddings (tokens, width) per model; SDXL's width is its two
# encoders' together (768 + 1280; the toy SDXL's 64 + 96)
SHAPES = {"toy": ((4, 8, 8), (16, 64)), "sd15": ((4, 64, 64), (77, 768)), "sdxl": ((4, 128, 128), (77, 2048)),
          "toy-sdxl": ((4, 8, 8), (16, 160))}
# SDXL's added conditioning: the pooled embedding's width and the image side in the size ids. Text inputs
# are random tensors in every row, as cached text-encoder outputs: no text encoder is loaded.
ADDED = {"sdxl": (1280, 1024), "toy-sdxl": (64, 32)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="toy,sd15",
                        help=f"comma-separated, from: {', '.join(MODELS)} (default: toy,sd15)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--steps-toy", type=int, default=20, help="timed steps for toy (default: 20)")
    parser.add_argument("--steps-sd15", type=int, default=None,
                        help="timed steps for sd15 (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default: 1)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; alpha = rank (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds per configuration before its row is marked failed (default: 3600)")
    parser.add_argument("--data-processes", default="1,2",
                        help="process counts for the data-generation rows, comma-separated ('' for none; default: 1,2)")
    parser.add_argument("--data-images", type=int, default=512, help="target images generated per row (default: 512)")
    parser.add_argument("--data-threads", type=int, default=None,
                        help="CPU threads per process in the data rows (default: cores / processes, the cores shared "
                             "out; 1 gives every process one core, as every process has its own GPU)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON here")


# ---------------------------------------------------------------- one configuration (in-process)


def build_unet(model: str, device: str):
    """The model's UNet in float32 on `device`."""
    import torch

    if model in ("toy", "toy-sdxl"):
        from dt_lora import toy

        return toy.load(device=device, model_dir=toy.SDXL_MODEL_DIR if model == "toy-sdxl" else None).unet
    if model in ("sd15", "sdxl"):
        from diffusers import UNet2DConditionModel

        config = json.loads((SD15_CONFIG if model == "sd15" else SDXL_CONFIG).read_text())
        with torch.device(device):  # random init directly on the device
            return UNet2DConditionModel.from_config(config)
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def _rss_bytes() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return None


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure(model: str, *, device: str = "cpu", gradient_checkpointing: bool = False,
            optimizer: str = "adamw", steps: int = 3, warmup: int = 1, rank: int = 8,
            lr: float = 1e-4, seed: int = 0, batch: int = 1) -> dict:
    """Build `model`'s UNet, attach LoRA and time `steps` training steps after `warmup` untimed ones.

    Returns a JSON-able dict: steps_per_s, s_per_step, trainable_params, peak_bytes,
    before_bytes, lora_max_change (max |LoRA weight after - before| over all steps),
    lora_B_max_change (the same over the B matrices, which start at zero: > 0 only when
    gradients were applied), losses, ... In-process, CPU memory figures are this process's
    (peak RSS since it started); run it in a fresh process (as the bench does) for clean ones.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from dt_lora.base.family import size_ids
    from dt_lora.shield.train import make_optimizer

    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError("need steps >= 1, warmup >= 0 and batch >= 1")
    cuda = torch.device(device).type == "cuda"
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # LoRA's gaussian init

    unet = build_unet(model, device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                init_lora_weights="gaussian"))
    lora = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    if cuda:  # frozen base in float16, trainable LoRA in float32 (as training does)
        unet.to(torch.float16)
        for p in lora.values():
            p.data = p.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in training with grad enabled
    opt = make_optimizer(optimizer, list(lora.values()), lr)
    initial = {name: p.detach().clone() for name, p in lora.items()}

    (channels, height, width), (tokens, text_width) = SHAPES[model]
    num_timesteps = 1000

    def step() -> torch.Tensor:
        latents = torch.randn((batch, channels, height, width), generator=generator, device=device)
        noise = torch.randn((batch, channels, height, width), generator=generator, device=device)
        text = torch.randn((batch, tokens, text_width), generator=generator, device=device)
        t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)
        added = {}
        if model in ADDED:
            pooled, side = ADDED[model]
            added["added_cond_kwargs"] = {
                "text_embeds": torch.randn((batch, pooled), generator=generator, device=device),
                "time_ids": size_ids(side).to(device).expand(batch, -1)}
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            prediction = unet(latents, t, text, **added).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        peak_before = _peak_rss_bytes()
    losses = [step() for _ in range(warmup)]
    sync()
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync()
    seconds = time.perf_counter() - start

    result = {
        "model": model,
        "device": device,
        "dtype": "fp16 base / fp32 LoRA (autocast)" if cuda else "float32",
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "rank": rank,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "s_per_step": seconds / steps,
        "trainable_params": sum(p.numel() for p in lora.values()),
        "lora_max_change": max((p.detach() - initial[name]).abs().max().item() for name, p in lora.items()),
        # B starts at zero, where weight decay does nothing: only applied gradients move it
        "lora_B_max_change": max((p.detach() - initial[name]).abs().max().item()
                                 for name, p in lora.items() if ".lora_B." in name),
        "losses": [float(loss) for loss in losses],
        "threads": torch.get_num_threads(),
        "before_bytes": before,
    }
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_set_by_steps"] = True
    else:
        result["peak_bytes"] = _peak_rss_bytes()
        result["peak_set_by_steps"] = result["peak_bytes"] > peak_before
    return result


def measure_data(images: int, processes: int, cache: str) -> dict | None:
    """Seconds of `prepare_data` (toy circle, `images` target images, no anchors) in this launch; the
    main process answers (None elsewhere: one result line, not N interleaved ones)."""
    from dt_lora import distributed, toy
    from dt_lora.base import unet_fingerprint
    from dt_lora.data import prepare_data
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path

    recipe = load_recipe(recipe_path("toy-circle"), {"target.images": str(images), "train.preservation": "none"})
    pipeline = toy.load(device=str(distributed.state().device))
    distributed.wait()
    started = time.perf_counter()
    prepare_data(pipeline, recipe, Path(cache) / f"{processes}-processes", base_fingerprint=unet_fingerprint(pipeline.unet),
                 progress=False)
    seconds = time.perf_counter() - started  # prepare_data returns once every shard is on disk
    if not distributed.is_main():
        return None
    return {"processes": distributed.processes(), "images": images, "seconds": round(seconds, 2),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None}


def run_data_rows(counts: list[int], images: int, device: str, timeout: float, threads: int | None) -> list[dict]:
    """One `measure_data` launch per process count: plain Python for 1, `accelerate launch` for more."""
    import tempfile

    from dt_lora import distributed

    rows = []
    with tempfile.TemporaryDirectory(prefix="dt-lora-bench-") as cache:
        for n in counts:
            env = dict(os.environ)
            if not device.startswith("cuda"):
                env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // n)))
            row = run_configuration({"images": images, "processes": n, "cache": cache}, timeout=timeout,
                                    launcher=distributed.launcher(n), env=env, flag="--_data_worker")
            rows.append(row)
            status = "FAILED: " + row["error"] if "error" in row else f"{row['seconds']:.1f} s"
            print(f"  data generation, {n} process(es): {status}", flush=True)
    return rows


def print_data_table(rows: list[dict]) -> None:
    done = [row for row in rows if "error" not in row]
    one = next((row["seconds"] for row in done if row["processes"] == 1), None)
    print(f"{'processes':>9} {'images':>6} {'threads':>7} {'seconds':>8} {'images/s':>8} {'speed-up':>8}")
    for row in done:
        speedup = f"{one / row['seconds']:.2f}x" if one else "n/a"
        print(f"{row['processes']:>9} {row['images']:>6} {row['threads'] or '-':>7} {row['seconds']:>8.1f} "
              f"{row['images'] / row['seconds']:>8.1f} {speedup:>8}")


def _worker(spec: str, function=measure) -> int:
    """Subprocess entry: run `function(**config)`, print its result (or error) as one tagged JSON line."""
    config = json.loads(spec)
    try:
        for name in ("diffusers", "transformers"):
            try:
                importlib.import_module(f"{name}.utils.logging").disable_progress_bar()
            except Exception:  # noqa: BLE001 - progress bars are cosmetic
                pass
        result = function(**config)
    except BaseException as error:  # noqa: BLE001 - a failed configuration is a row, not a crash
        result = {**config, "error": f"{type(error).__name__}: {error}".strip()}
    if result is not None:
        print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the bench (one subprocess per configuration)


def run_configuration(config: dict, timeout: float | None = None, module: str = "bench.train", *,
                      launcher: list[str] | None = None, env: dict | None = None, flag: str = "--_worker") -> dict:
    """Run `measure(**config)` in a fresh Python process and return its result (or a failed row).

    `module` is the worker's module: another bench's (`python -m MODULE --_worker SPEC`, answering with
    the same tagged JSON line) runs its own function there. `launcher` replaces the plain interpreter
    (with `accelerate launch`, say), `flag` chooses the worker's function (`--_data_worker`: `measure_data`).
    """
    command = [*(launcher or [sys.executable]), "-m", module, flag, json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    reason = f"worker exited with status {done.returncode}"
    if done.returncode < 0:
        reason += f" (killed by signal {-done.returncode}{', out of memory?' if done.returncode == -9 else ''})"
    return {**config, "error": f"{reason}: {tail[0][:200]}".rstrip(": ")}


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) and value >= 0 else "n/a"


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<5} {'device':<6} {'dtype':<12} {'ckpt':<4} {'optimizer':<9} {'LoRA params':>11} "
              f"{'steps/s':>8} {'s/step':>8} {'peak GiB':>8} {'before GiB':>10} {'+step GiB':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        start = (f"{row['model']:<5} {row['device']:<6} {_dtype_short(row):<12} "
                 f"{'on' if row['gradient_checkpointing'] else 'off':<4} {row['optimizer']:<9} ")
        if "error" in row:
            reason = (row["error"].splitlines() or [""])[0]
            print(start + f"FAILED: {reason[:160]}")
            continue
        extra = row["peak_bytes"] - row["before_bytes"] if row.get("before_bytes") is not None else None
        extra_text = ("" if row.get("peak_set_by_steps", True) else "<=") + _gib(extra) if extra is not None else "n/a"
        print(start + f"{row['trainable_params']:>11,} {row['steps_per_s']:>8.3f} {row['s_per_step']:>8.3f} "
                      f"{_gib(row['peak_bytes']):>8} {_gib(row.get('before_bytes')):>10} {extra_text:>9}")


def _dtype_short(row: dict) -> str:
    return "fp16+fp32" if row["device"].startswith("cuda") else "float32"


def target_line(rows: list[dict], device: str, model: str = "sd15") -> str:
    target, limit = (SDXL_TARGET, SDXL_TARGET_BYTES) if model == "sdxl" else (TARGET, TARGET_BYTES)
    if not device.startswith("cuda"):
        return f"target: {target}: needs a GPU, not measured on CPU."
    row = next((r for r in rows if r["model"] == model and r["gradient_checkpointing"]
                and r["optimizer"] == "adamw8bit"), None)
    if row is None:
        return f"target: {target}: not measured (run with --models including {model})."
    if "error" in row:
        return f"target: {target}: NOT MET / not measured, the run failed: {row['error']}"
    reserved = row.get("peak_reserved_bytes", row["peak_bytes"])
    verdict = "met" if reserved <= limit else "NOT met"
    return (f"target: {target}: {verdict}; peak allocated {_gib(row['peak_bytes'])} GiB, "
            f"reserved {_gib(reserved)} GiB vs {limit / GIB:.0f} GiB (the CUDA context, a few hundred MiB, comes on top).")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    full_size = args.steps_sd15 or (20 if cuda else 3)
    steps = {"toy": args.steps_toy, "toy-sdxl": args.steps_toy, "sd15": full_size, "sdxl": full_size}

    print(f"train bench: LoRA r={args.rank} on {'/'.join(LORA_TARGETS)}, batch 1, device {device}, "
          f"{args.warmup} warm-up step(s) untimed, one fresh process per row")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {load_note()}")
    if cuda and torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(torch.device(device))}")
    rows = []
    for model in models:
        for checkpointing in (False, True):
            for optimizer in OPTIMIZERS:
                config = dict(model=model, device=device, gradient_checkpointing=checkpointing,
                              optimizer=optimizer, steps=steps[model], warmup=args.warmup,
                              rank=args.rank, lr=args.lr, seed=args.seed)
                row = run_configuration(config, timeout=args.timeout)
                rows.append(row)
                status = "FAILED" if "error" in row else f"{row['s_per_step']:.3f} s/step"
                print(f"  {model} ckpt={'on' if checkpointing else 'off'} {optimizer}: {status}", flush=True)

    counts = [int(n) for n in args.data_processes.split(",") if n.strip()]
    data_rows = run_data_rows(counts, args.data_images, device, args.timeout, args.data_threads) if counts else []

    print()
    print_table(rows)
    print()
    print(target_line(rows, device))
    if data_rows:
        print(f"\ndata generation (toy circle, {args.data_images} images, 25 sampler steps):")
        print_data_table(data_rows)
    print(f"after: {load_note()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "rows": rows, "data_rows": data_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    worker = argparse.ArgumentParser(prog="python -m bench.train")
    worker.add_argument("--_worker", dest="spec", help=argparse.SUPPRESS)
    worker.add_argument("--_data_worker", dest="data_spec", help=argparse.SUPPRESS)
    worker_args = worker.parse_args()
    if worker_args.data_spec:
        sys.exit(_worker(worker_args.data_spec, measure_data))
    sys.exit(_worker(worker_args.spec))
