"""Build the canvas world's model from nothing: `python -m worlds.canvas.build --out DIR`.

Stages, each seeded and each saving its result into DIR so a later stage (or a re-run with
`--stages`) starts from it:

  tokenizer  a CLIP BPE over ordinary English and the world's words, and the context words   (training/model.py)
  vae        AutoencoderKL, 48×48×3 ↔ 12×12×8, trained on renders                              (training/model.py)
  denoiser   CLIPTextModel (128 wide) and UNet2DConditionModel trained jointly on the VAE's latents; it
             checkpoints into DIR/build/denoiser and a re-run resumes there (hours on two cores: run it
             in as many sittings as you like)
  evaluator  the classifier of object, colour, style and mark that scores generations          (training/evaluator.py)
  card       measure the finished pipeline with the evaluator and write README.md + sample grid (training/card.py)

The shipped package data (python/dt_lora/canvas/model) is this script's output, stored in float16,
without DIR/build. The tokenizer stage needs `wordfreq` (`pip install '.[worlds]'`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGES = ("tokenizer", "vae", "denoiser", "evaluator", "card")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worlds.canvas.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (the pipeline folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=6000)
    parser.add_argument("--evaluator-steps", type=int, default=1500)
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")

    from worlds.canvas.training.model import build_tokenizer, train_denoiser, train_vae
    from worlds.toy.training.model import assemble

    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        if stage == "tokenizer":
            build_tokenizer(out)
        elif stage == "vae":
            train_vae(out, steps=args.vae_steps, batch_size=32, seed=args.seed)
        elif stage == "denoiser":
            train_denoiser(out, steps=args.denoiser_steps, batch_size=64, dataset_size=40_000, seed=args.seed + 10)
            assemble(out)
        elif stage == "evaluator":
            from worlds.canvas.training.evaluator import train_evaluator

            train_evaluator(out, steps=args.evaluator_steps, seed=args.seed + 20)
        elif stage == "card":
            from worlds.canvas.training.card import write_card

            print(json.dumps(write_card(out), indent=2))
        print(f"[build] {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[build] total: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
