"""`dt-lora train` mechanics on the toy world: cache, resume, divergence, adapter format, CLI.

Runs are tiny (a few images, a few steps); the shielding quality lives in test_shielding.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dt_lora import data as data_module
from dt_lora import toy
from dt_lora.adapters import AdapterError, read_adapter
from dt_lora.base import unet_fingerprint
from dt_lora.cli import main
from dt_lora.recipe import load_recipe
from dt_lora.scramble import scramble_grid
from dt_lora.train import CHECKPOINT, TrainingDiverged, train_adapter

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
TINY = {"target.images": "8", "anchors.images": "8", "train.steps": "6", "train.batch_size": "4",
        "train.checkpoint_every": "2", "sampling.steps": "4", "lora.rank": "4", "lora.alpha": "2"}


@pytest.fixture(scope="module")
def pipeline():
    return toy.load()


def tiny_recipe(**extra):
    return load_recipe(ADAPTERS / "toy-circle.toml", {**TINY, **extra})


def test_resumed_run_equals_uninterrupted_run(pipeline, tmp_path):
    recipe = tiny_recipe()
    whole = train_adapter(recipe, tmp_path / "whole.safetensors", cache_dir=tmp_path / "cache",
                          pipeline=pipeline, progress=False)
    part = train_adapter(recipe, tmp_path / "resumed.safetensors", cache_dir=tmp_path / "cache",
                         pipeline=pipeline, progress=False, stop_after=3)
    assert part.adapter is None and (tmp_path / "resumed.safetensors.work" / CHECKPOINT).is_file()
    resumed = train_adapter(recipe, tmp_path / "resumed.safetensors", cache_dir=tmp_path / "cache",
                            pipeline=pipeline, progress=False)
    assert resumed.resumed_from == 3 and whole.resumed_from == 0
    a, b = read_adapter(whole.adapter), read_adapter(resumed.adapter)
    assert a.weights.keys() == b.weights.keys()
    # same batches, same optimizer state: equal up to float summation order in the kernels (one
    # optimizer step at this learning rate moves weights by ~1e-3, far above the tolerance)
    for key in a.weights:
        torch.testing.assert_close(a.weights[key], b.weights[key], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "resumed.safetensors.work").exists()  # cleaned up after success
    # the base pipeline is left as it was found
    assert not getattr(pipeline.unet, "peft_config", None)


def test_adapter_carries_format_and_provenance(pipeline, tmp_path):
    result = train_adapter(tiny_recipe(), tmp_path / "a.safetensors", cache_dir=tmp_path / "cache",
                           pipeline=pipeline, progress=False)
    adapter = read_adapter(result.adapter)
    assert adapter.rank == 4 and adapter.alpha == 2.0
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter.weights)
    assert any(".attn1.to_q." in k for k in adapter.weights) and any(".attn2.to_out.0." in k for k in adapter.weights)
    (concept,) = adapter.concepts
    assert concept["name"] == "toy-circle" and concept["base"] == "toy"
    assert concept["base_fingerprint"] == unet_fingerprint(pipeline.unet)
    assert concept["scramble"]["grid"] == 4 and concept["train"]["steps"] == 6
    assert "a red circle" in concept["prompts"]


def test_diffusers_loads_the_adapter_with_its_alpha(pipeline, tmp_path):
    """alpha (2) ≠ rank (4): diffusers must apply scale alpha/rank = 0.5, read from our metadata."""
    result = train_adapter(tiny_recipe(**{"train.learning_rate": "0.05"}), tmp_path / "a.safetensors",
                           cache_dir=tmp_path / "cache", pipeline=pipeline, progress=False)
    adapter = read_adapter(result.adapter)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 100])
    text = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))

    expected_unet = toy.load().unet
    with torch.no_grad():
        for name, module in expected_unet.named_modules():
            if f"{name}.lora_A.weight" in adapter.weights:
                delta = adapter.weights[f"{name}.lora_B.weight"] @ adapter.weights[f"{name}.lora_A.weight"]
                module.weight += delta * (adapter.alpha / adapter.rank)
        expected = expected_unet(x, t, text).sample

    pipe = toy.load()
    pipe.load_lora_weights(str(result.adapter), adapter_name="shield")
    with torch.no_grad():
        got = pipe.unet(x, t, text).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, text).sample
    assert (expected - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_data_cache_is_reused_and_damaged_shards_rebuilt(pipeline, tmp_path, monkeypatch):
    recipe = tiny_recipe()
    fingerprint = unet_fingerprint(pipeline.unet)
    first = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)

    calls = []
    real_generate = data_module.generate_images
    monkeypatch.setattr(data_module, "generate_images", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    again = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)
    assert calls == []
    torch.testing.assert_close(again.target_latents, first.target_latents, rtol=0, atol=0)

    shard = first.cache_dir / "target-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash of a non-atomic writer
    rebuilt = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)
    assert calls == [1]
    torch.testing.assert_close(rebuilt.target_latents, first.target_latents)

    other = data_module.prepare_data(pipeline, tiny_recipe(**{"scramble.grid": "2"}), tmp_path,
                                     base_fingerprint=fingerprint, progress=False)
    assert other.cache_dir != first.cache_dir  # the key follows the data settings


def test_target_latents_are_scrambled_in_the_chosen_space(pipeline, tmp_path):
    fingerprint = unet_fingerprint(pipeline.unet)
    recipe = tiny_recipe(**{"scramble.space": "latent"})
    prepared = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)
    seed = data_module.TARGET_SEED_BASE
    images = data_module.generate_images(pipeline, recipe.target_prompts[:8], seed=seed, steps=4, guidance=5.0)
    clean = data_module.encode_pixels(pipeline.vae, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(prepared.target_latents, scramble_grid(clean.contiguous(), 4, seed))

    pixel = data_module.prepare_data(pipeline, tiny_recipe(), tmp_path, base_fingerprint=fingerprint, progress=False)
    assert not torch.allclose(pixel.target_latents, clean, atol=1e-2)
    # anchors are never scrambled
    torch.testing.assert_close(pixel.anchor_latents, prepared.anchor_latents)


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(pipeline, tmp_path):
    recipe = tiny_recipe(**{"train.learning_rate": "1e4", "train.optimizer": "adamw", "train.steps": "40",
                            "train.checkpoint_every": "1"})
    with pytest.raises(TrainingDiverged, match=r"loss became .* at step \d+.*last good checkpoint"):
        train_adapter(recipe, tmp_path / "a.safetensors", cache_dir=tmp_path / "cache",
                      pipeline=pipeline, progress=False)
    assert not (tmp_path / "a.safetensors").exists()
    assert (tmp_path / "a.safetensors.work" / CHECKPOINT).is_file()
    assert not getattr(pipeline.unet, "peft_config", None)  # cleaned up on failure too


def test_refuses_to_overwrite(pipeline, tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_adapter(tiny_recipe(), out, cache_dir=tmp_path / "cache", pipeline=pipeline, progress=False)
    assert out.read_bytes() == b"keep me"


def test_read_adapter_rejects_bad_files(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "missing.safetensors")
    pickle_like = tmp_path / "model.ckpt"
    pickle_like.write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(AdapterError, match="not a readable .safetensors"):
        read_adapter(pickle_like)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match="lora_adapter_metadata"):
        read_adapter(tmp_path / "plain.safetensors")


def test_cli_trains_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "shield.safetensors"
    flags = [f"--{k.replace('.', '-').replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["train", str(ADAPTERS / "toy-circle.toml"), "-o", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "-q", *flags])
    assert code == 0 and out.is_file()
    assert "wrote" in capsys.readouterr().out
    assert read_adapter(out).concepts[0]["train"]["steps"] == 6

    code = main(["train", str(ADAPTERS / "toy-circle.toml"), "-o", str(out), "-q", *flags])
    assert code == 2 and "--overwrite" in capsys.readouterr().err

    code = main(["train", str(ADAPTERS / "toy-circle.toml"), "-o", str(tmp_path / "b.safetensors"),
                 "--train-steps", "lots"])
    err = capsys.readouterr().err
    assert code == 2 and "train.steps: expected int, got 'lots'" in err and "Traceback" not in err

    code = main(["train", str(ADAPTERS / "toy-circle.toml"), "-o", str(tmp_path / "c.safetensors"),
                 "--base", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "model_index.json" in err


def test_user_image_folder_replaces_generation(pipeline, tmp_path, monkeypatch):
    from PIL import Image

    from dt_lora.toy import world

    folder = tmp_path / "mine"
    folder.mkdir()
    images, _ = world.sample(3, 5, shape="circle")
    for i, image in enumerate(images):
        Image.fromarray(image).resize((48, 40)).save(folder / f"{i}.png")  # any size: centre-cropped, resized
    monkeypatch.setattr(data_module, "generate_images", lambda *a, **k: pytest.fail("generated target images"))
    recipe = tiny_recipe(**{"target.image_folder": str(folder), "train.preservation": "none",
                            "target.images": "6"})
    prepared = data_module.prepare_data(pipeline, recipe, tmp_path / "cache",
                                        base_fingerprint=unet_fingerprint(pipeline.unet), progress=False)
    assert prepared.target_latents.shape == (6, 4, 8, 8)
    # six samples cycle through the three user images, each scrambled with its own permutation
    assert not torch.equal(prepared.target_latents[0], prepared.target_latents[3])

    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        data_module.load_image_folder(folder, 32)


def test_gradient_checkpointing_and_training_samples(pipeline, tmp_path):
    recipe = tiny_recipe(**{"train.gradient_checkpointing": "true", "train.sample_every": "3"})
    work = tmp_path / "work"
    result = train_adapter(recipe, tmp_path / "a.safetensors", cache_dir=tmp_path / "cache",
                           work_dir=work, pipeline=pipeline, progress=False)
    assert result.adapter.is_file()
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert not pipeline.unet.is_gradient_checkpointing


def test_ctrl_c_then_same_command_resumes(pipeline, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "a.safetensors"
    overrides = {**TINY, "train.steps": "150", "train.checkpoint_every": "5"}
    flags = [f"--{k.replace('.', '-').replace('_', '-')}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "dt_lora", "train", str(ADAPTERS / "toy-circle.toml"), "-o", str(out),
               "--cache-dir", str(tmp_path / "cache"), "-q", *flags]
    checkpoint = tmp_path / "a.safetensors.work" / CHECKPOINT
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert checkpoint.is_file() and not out.exists()

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from step" in finished.stdout
    reference = train_adapter(load_recipe(ADAPTERS / "toy-circle.toml", overrides), tmp_path / "ref.safetensors",
                              cache_dir=tmp_path / "cache", pipeline=pipeline, progress=False)
    a, b = read_adapter(out), read_adapter(reference.adapter)
    for key in a.weights:
        torch.testing.assert_close(a.weights[key], b.weights[key], rtol=1e-4, atol=1e-5)
