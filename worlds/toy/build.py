"""Build the toy world's model from nothing: `python -m worlds.toy.build --out DIR`.

Stages, each seeded and each saving its result into DIR so a later stage (or a re-run with
`--stages`) starts from it:

  tokenizer  a CLIP BPE vocabulary over the toy world's words                   (training/model.py)
  vae        AutoencoderKL, 32×32×3 ↔ 8×8×4, trained on renders                 (training/model.py)
  denoiser   CLIPTextModel and UNet2DConditionModel trained jointly on the VAE's latents; the text
             encoder must learn the words too, or neighbouring concepts would share one embedding
  evaluator  the shape/colour classifier that scores generations                (training/evaluator.py)
  controlnet a ControlNet on the finished UNet, conditioned on location maps    (training/controlnet.py);
             saved to DIR/controlnet, outside model_index.json, so the pipeline loads as before
  card       measure the finished pipeline with the evaluator and write README.md + sample grid
  sdxl       the toy SDXL (training/sdxl.py): SDXL's architecture and conditioning, trained on the same
             world with the tokenizer, VAE and evaluator above, into --sdxl-out; then its card

The shipped package data (python/dt_lora/toy/model and model_sdxl) is this script's output, stored in
float16.
The training code lives in `worlds.toy.training`; nothing at run time imports it or this module:
`dt_lora.toy` only loads and measures what they wrote.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGES = ("tokenizer", "vae", "denoiser", "evaluator", "controlnet", "card", "sdxl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.toy.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (the pipeline folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=6000)
    parser.add_argument("--evaluator-steps", type=int, default=2500)
    parser.add_argument("--controlnet-steps", type=int, default=1200)
    parser.add_argument("--sdxl-steps", type=int, default=3000)
    parser.add_argument("--sdxl-out", type=Path, default=None,
                        help="the toy SDXL's pipeline folder (default: model_sdxl beside --out)")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")

    from worlds.toy.training.card import write_card
    from worlds.toy.training.controlnet import train_controlnet
    from worlds.toy.training.evaluator import train_evaluator
    from worlds.toy.training.model import assemble, build_tokenizer, train_denoiser, train_vae
    from worlds.toy.training.sdxl import train_sdxl

    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        if stage == "tokenizer":
            build_tokenizer(out / "tokenizer")
        elif stage == "vae":
            train_vae(out, steps=args.vae_steps, batch_size=32, seed=args.seed)
        elif stage == "denoiser":
            train_denoiser(out, steps=args.denoiser_steps, batch_size=64, dataset_size=30_000, seed=args.seed + 10)
            assemble(out)
        elif stage == "evaluator":
            train_evaluator(out, steps=args.evaluator_steps, seed=args.seed + 20)
        elif stage == "controlnet":
            train_controlnet(out, steps=args.controlnet_steps, batch_size=64, dataset_size=10_000, seed=args.seed + 30)
        elif stage == "card":
            print(json.dumps(write_card(out), indent=2))
        elif stage == "sdxl":
            sdxl_out = args.sdxl_out or out.parent / "model_sdxl"
            train_sdxl(sdxl_out, out, steps=args.sdxl_steps, batch_size=64, dataset_size=30_000, seed=args.seed + 40)
            print(json.dumps(write_card(sdxl_out, evaluator=out / "evaluator"), indent=2))  # the same judge
        print(f"[build] {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[build] total: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
