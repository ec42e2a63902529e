"""The canvas build: its long stage resumes where it stopped and trains exactly as an unbroken run, and
what its VAE decodes still reads as what was drawn (research/canvas_vae.py's measurement)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dt_lora import canvas
from dt_lora.canvas import world
from dt_lora.canvas.quality import EVAL_SEED, attribute_accuracy
from worlds.canvas.training import architecture
from worlds.canvas.training import model as canvas_model
from worlds.training import write_clip_bpe


@pytest.fixture()
def started_build(tmp_path):
    """What the denoiser stage needs from the stages before it: a tokenizer (of the world's words only,
    to be quick), the context words and a VAE (untrained: the resume does not depend on it)."""
    write_clip_bpe(tmp_path / "tokenizer", [" ".join(world.world_words())], vocab_size=2000,
                   model_max_length=architecture.TOKENIZER_MAX_LENGTH)
    (tmp_path / canvas_model.CONTEXT_WORDS_FILE).write_text(json.dumps({"train": ["harbour"], "heldout": ["tea"]}))
    torch.manual_seed(0)
    architecture.make_vae().save_pretrained(tmp_path / "vae")
    return tmp_path


def _weights(folder):
    return {**load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            **load_file(folder / "text_encoder" / "model.safetensors")}


def test_an_interrupted_denoiser_resumes_at_its_checkpoint_and_ends_where_an_unbroken_run_ends(
        started_build, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(canvas_model, "CHECKPOINT_EVERY", 2)
    settings = {"batch_size": 2, "dataset_size": 16, "seed": 5}
    unbroken = tmp_path_factory.mktemp("unbroken")
    shutil.copytree(started_build, unbroken, dirs_exist_ok=True)
    canvas_model.train_denoiser(unbroken, steps=4, **settings)

    canvas_model.train_denoiser(started_build, steps=2, **settings)  # stops after its checkpoint at 2
    assert (started_build / "build" / "denoiser" / "state.json").read_text() == '{"step": 2}'
    canvas_model.train_denoiser(started_build, steps=4, **settings)

    a, b = _weights(unbroken), _weights(started_build)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((started_build / "build").glob("*.partial"))


def test_what_the_shipped_vae_decodes_still_reads_as_what_was_drawn():
    from diffusers import AutoencoderKL

    from research.canvas_vae import round_trip

    evaluator = canvas.load_evaluator()
    vae = AutoencoderKL.from_pretrained(canvas.MODEL_DIR / "vae", dtype=torch.float32).eval()
    images, scenes = world.sample(128, EVAL_SEED + 8, character_rate=0.5)
    scores = attribute_accuracy(evaluator.read(round_trip(vae, images)), [s.look for s in scenes])
    assert all(score >= 0.95 for score in scores.values()), scores
