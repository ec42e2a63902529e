"""`dt-lora train` mechanics on the toy world: cache, resume, divergence, adapter format, CLI.

Runs are tiny (a few images, a few steps); the shielding quality lives in end_to_end/test_shielding.py.
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
from dt_lora.recipe import RecipeError, load_recipe
from dt_lora.scramble import scramble_grid
from dt_lora.shield.checkpoint import CHECKPOINT, Checkpoint, CheckpointError, TrainingDiverged, run_identity
from dt_lora.shield.losses import adapter_strength, update_uninterrupted
from dt_lora.shield.train import train_adapter

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
TINY = {"target.images": "8", "anchors.images": "8", "train.steps": "6", "train.batch_size": "4",
        "train.checkpoint_every": "2", "sampling.steps": "4", "lora.rank": "4", "lora.alpha": "2"}


@pytest.fixture(scope="module")
def pipeline():
    return toy.load()


def tiny_recipe(**extra):
    return load_recipe(ADAPTERS / "toy-circle.toml", {**TINY, **extra})


def test_resumed_run_equals_uninterrupted_run(pipeline, tmp_path):
    recipe = tiny_recipe()
    keys = set(pipeline.unet.state_dict())
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
    # the base pipeline is left as it was found: it saves and loads as before (no `base_layer` weights)
    assert not getattr(pipeline.unet, "peft_config", None) and set(pipeline.unet.state_dict()) == keys


def test_adapter_carries_format_and_provenance(pipeline, tmp_path):
    result = train_adapter(tiny_recipe(), tmp_path / "a.safetensors", cache_dir=tmp_path / "cache",
                           pipeline=pipeline, progress=False)
    adapter = read_adapter(result.adapter)
    assert adapter.rank == 4 and adapter.alpha == 2.0
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter.weights)
    # the default text-local shield: cross-attention keys and values only
    assert {k.split(".")[-3] for k in adapter.weights} == {"to_k", "to_v"}
    assert all(".attn2." in k for k in adapter.weights)
    (concept,) = adapter.concepts
    assert concept["name"] == "toy-circle" and concept["base"] == "toy"
    assert concept["base_fingerprint"] == unet_fingerprint(pipeline.unet)
    assert concept["scramble"]["grid"] == 4 and concept["train"]["steps"] == 6
    assert "a red circle" in concept["prompts"] and concept["lora"]["text_local"] is True


def test_an_auto_target_strength_is_computed_for_each_shield_and_recorded(pipeline, tmp_path):
    """train.target_scale_min "auto": from a text-local shield's directions (the value is checked in
    test_locality), the default TARGET_SCALE_MIN for a free LoRA; a number is recorded as given."""
    from dt_lora.recipe import TARGET_SCALE_MIN

    def recorded(name, **extra):
        result = train_adapter(tiny_recipe(**extra), tmp_path / f"{name}.safetensors", cache_dir=tmp_path / "cache",
                               pipeline=pipeline, progress=False)
        return read_adapter(result.adapter).concepts[0]["train"]["target_scale_min"]

    assert 0.1 < recorded("auto", **{"train.target_scale_min": "auto"}) < 0.5  # the circle answers strongly
    assert recorded("free", **{"train.target_scale_min": "auto", "lora.text_local": "false"}) == \
        TARGET_SCALE_MIN
    assert recorded("given", **{"train.target_scale_min": "0.75"}) == 0.75


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


def test_divergence_stops_with_a_clear_error_and_keeps_no_checkpoint(pipeline, tmp_path):
    """More in test_checkpoint.py: what is checked, and that the command the message gives trains."""
    recipe = tiny_recipe(**{"train.learning_rate": "1e4", "train.optimizer": "adamw", "train.steps": "40",
                            "train.checkpoint_every": "1"})
    with pytest.raises(TrainingDiverged, match=r"^training diverged: .* step \d+ .*--train-learning-rate 1000 "):
        train_adapter(recipe, tmp_path / "a.safetensors", cache_dir=tmp_path / "cache",
                      pipeline=pipeline, progress=False)
    assert not (tmp_path / "a.safetensors").exists()
    assert not (tmp_path / "a.safetensors.work" / CHECKPOINT).exists()  # it would diverge again
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


def test_ctrl_c_during_an_update_arrives_once_the_update_is_whole():
    """A Ctrl-C between optimizer.step() and the step count would make a resumed run replay an update."""
    import signal

    # as in an interactive terminal (a shell's background job, as some CI runners start the suite, ignores it)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with update_uninterrupted():
                signal.raise_signal(signal.SIGINT)
                done.append("the rest of the update")
        assert done == ["the rest of the update"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_ctrl_c_then_same_command_resumes(pipeline, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "a.safetensors"
    overrides = {**TINY, "train.steps": "60", "train.checkpoint_every": "5"}
    flags = [f"--{k.replace('.', '-').replace('_', '-')}={v}" for k, v in overrides.items()]
    command = [sys.executable, "-m", "dt_lora", "train", str(ADAPTERS / "toy-circle.toml"), "-o", str(out),
               "--cache-dir", str(tmp_path / "cache"), "-q", *flags]
    checkpoint = tmp_path / "a.safetensors.work" / CHECKPOINT
    # a shell's background job (`cmd &`, as some CI runners start the suite) ignores SIGINT, and so would
    # the child, which inherits it: give the child the default disposition, as an interactive user's has
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# ---- nothing is generated before every refusable input is refused


def no_generation(monkeypatch):
    monkeypatch.setattr(data_module, "generate_images", lambda *a, **k: pytest.fail("generated images"))


def test_grid_that_does_not_tile_the_images_fails_before_any_generation(pipeline, tmp_path, monkeypatch):
    no_generation(monkeypatch)
    for grid, space in (("5", "pixel"), ("16", "latent")):
        with pytest.raises(RecipeError, match=rf"scramble\.grid: {grid} does not divide the base model's"):
            train_adapter(tiny_recipe(**{"scramble.grid": grid, "scramble.space": space}), tmp_path / "a.safetensors",
                          cache_dir=tmp_path / "cache", pipeline=pipeline, progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "a.safetensors.work").exists()


def test_missing_bitsandbytes_fails_before_any_generation(pipeline, tmp_path, monkeypatch):
    import sys

    no_generation(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(RecipeError, match=r"train\.optimizer = 'adamw8bit' needs bitsandbytes"):
        train_adapter(tiny_recipe(**{"train.optimizer": "adamw8bit"}), tmp_path / "a.safetensors",
                      cache_dir=tmp_path / "cache", pipeline=pipeline, progress=False)


# ---- checkpoints carry the identity of their run


def identity_of(recipe, pipeline, fingerprint=None):
    fingerprint = fingerprint or unet_fingerprint(pipeline.unet)
    return run_identity(recipe, fingerprint, data_module.data_key(recipe, fingerprint))


def write_checkpoint(folder, identity):
    """A small, well-formed checkpoint (its tensors need not fit a UNet: identity is checked first)."""
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    Checkpoint(folder, identity).write(3, {"layer.lora_A.weight": weight}, optimizer, 0.5)
    return folder / CHECKPOINT


@pytest.mark.parametrize("started_with, fingerprint, message", [
    ({"train.learning_rate": "0.01"}, None, r"the recipe changed \(train\.learning_rate 0\.01 -> 0\.001\)"),
    ({"lora.rank": "8"}, None, r"the recipe changed \(lora\.rank 8 -> 4\)"),
    ({"anchors.images": "16"}, None, r"anchors\.images 16 -> 8"),
    ({}, "0123456789abcdef", r"another base model \(UNet fingerprint 0123456789abcdef"),
])
def test_resume_refuses_another_run_before_any_work(pipeline, tmp_path, monkeypatch, started_with, fingerprint,
                                                    message):
    work = tmp_path / "a.safetensors.work"
    path = write_checkpoint(work, identity_of(tiny_recipe(**started_with), pipeline, fingerprint))
    before = path.read_bytes()
    no_generation(monkeypatch)
    with pytest.raises(CheckpointError) as error:
        train_adapter(tiny_recipe(), tmp_path / "a.safetensors", cache_dir=tmp_path / "cache", pipeline=pipeline,
                      progress=False)
    text = str(error.value)
    assert "\n" not in text and str(work) in text and "to start over, delete" in text and "--out" in text
    import re

    assert re.search(message, text), text
    assert path.read_bytes() == before and not (tmp_path / "a.safetensors").exists()
    assert not getattr(pipeline.unet, "peft_config", None)


def test_checkpoint_of_an_older_dt_lora_is_not_resumed(pipeline, tmp_path):
    from safetensors.torch import save_file

    work = tmp_path / "work"
    work.mkdir()
    save_file({"lora.x": torch.zeros(1)}, work / CHECKPOINT,
              metadata={"dt_lora_checkpoint": '{"step": 3, "loss": 0.5, "scalars": {}, "param_groups": []}'})
    with pytest.raises(CheckpointError, match=r"records no recipe \(written by an older dt-lora\)"):
        Checkpoint(work, identity_of(tiny_recipe(), pipeline)).read()


def test_settings_that_do_not_change_training_may_change_on_resume(pipeline):
    a = identity_of(tiny_recipe(), pipeline)
    b = identity_of(tiny_recipe(**{"train.checkpoint_every": "5", "train.sample_every": "2",
                                   "train.gradient_checkpointing": "true"}), pipeline)
    assert a == b
    assert a != identity_of(tiny_recipe(**{"train.steps": "7"}), pipeline)  # the lr schedule depends on it


def test_truncated_checkpoint_is_one_line_and_exit_2(pipeline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.safetensors"
    work = tmp_path / "a.safetensors.work"
    path = write_checkpoint(work, identity_of(tiny_recipe(), pipeline))
    path.write_bytes(path.read_bytes()[:-40])  # cut off as by a full disk
    damaged = path.read_bytes()
    no_generation(monkeypatch)
    flags = [f"--{k.replace('.', '-').replace('_', '-')}={v}" for k, v in TINY.items()]
    code = main(["train", str(ADAPTERS / "toy-circle.toml"), "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "-q", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if "checkpoint" in line]  # beside the loading progress bars
    assert "Traceback" not in err and line.startswith("dt-lora train: error: ")
    assert f"{path}: damaged checkpoint" in line and f"delete {work}" in line
    # nothing written, nothing removed
    assert path.read_bytes() == damaged and sorted(p.name for p in work.iterdir()) == [CHECKPOINT]
    assert not out.exists()


def test_adapter_strength_is_restored_on_error():
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
                                    torch.nn.Sequential(torch.nn.Linear(4, 4)), adapter_name="x")
    layer = model[0]
    assert layer.scaling["x"] == 2.0  # alpha / rank
    with pytest.raises(KeyError):
        with adapter_strength([layer], "x", 1.5):
            assert layer.scaling["x"] == 3.0
            raise KeyError("a failing forward pass")
    assert layer.scaling["x"] == 2.0


# ---- the data cache: keyed by what the data depends on


def test_data_key_of_a_default_recipe_is_stable():
    # caches built by earlier versions stay valid: the key of a recipe without image_folder, generated
    # in float32, must not change (update only on purpose, knowing that every cache is rebuilt)
    assert data_module.data_key(load_recipe(ADAPTERS / "toy-circle.toml"), "abc") == "b1f85faacfe45ddc"


def test_replaced_user_images_are_not_served_from_a_stale_cache(pipeline, tmp_path):
    import os

    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    recipe = tiny_recipe(**{"target.image_folder": str(folder), "train.preservation": "none", "target.images": "2"})
    fingerprint = unet_fingerprint(pipeline.unet)
    first = data_module.prepare_data(pipeline, recipe, tmp_path / "cache", base_fingerprint=fingerprint,
                                     progress=False)
    stat = (folder / "0.png").stat()
    Image.new("RGB", (32, 32), "blue").save(folder / "0.png")  # same name, same size
    os.utime(folder / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same modification time
    second = data_module.prepare_data(pipeline, recipe, tmp_path / "cache", base_fingerprint=fingerprint,
                                      progress=False)
    assert second.cache_dir != first.cache_dir
    assert not torch.allclose(second.target_latents[0], first.target_latents[0])
    torch.testing.assert_close(second.target_latents[1], first.target_latents[1])
    # the key follows the contents, not the path: a moved folder reuses the cache
    moved = folder.rename(tmp_path / "moved")
    third = data_module.prepare_data(pipeline, tiny_recipe(**{"target.image_folder": str(moved),
                                                              "train.preservation": "none", "target.images": "2"}),
                                     tmp_path / "cache", base_fingerprint=fingerprint, progress=False)
    assert third.cache_dir == second.cache_dir


def test_half_precision_generation_only_on_cuda(pipeline):
    from types import SimpleNamespace

    fp16 = tiny_recipe(**{"train.mixed_precision": "fp16"})
    assert data_module.generation_dtype(pipeline, fp16) is None  # CPU: float32, caches unchanged
    cuda = SimpleNamespace(device=torch.device("cuda"))
    assert data_module.generation_dtype(cuda, fp16) == torch.float16
    assert data_module.generation_dtype(cuda, tiny_recipe(**{"train.mixed_precision": "bf16"})) == torch.bfloat16
    assert data_module.generation_dtype(cuda, tiny_recipe()) is None


def test_half_precision_generation_keeps_the_cache_exact_and_the_unet_intact(pipeline, tmp_path, monkeypatch):
    """The CUDA path, run on CPU in bfloat16: UNet cast for sampling only, VAE encode in float32, own key."""
    recipe = tiny_recipe(**{"train.mixed_precision": "bf16", "train.preservation": "none", "target.images": "4"})
    fingerprint = unet_fingerprint(pipeline.unet)
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    full = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)

    seen = []
    real_generate, real_encode = data_module.generate_images, data_module.encode_pixels

    def generate(pipe, *args, **kwargs):
        seen.append(("generate", pipe.unet.dtype, torch.is_autocast_enabled("cpu")))
        return real_generate(pipe, *args, **kwargs)

    def encode(vae, pixels):
        seen.append(("encode", vae.dtype, torch.is_autocast_enabled("cpu")))
        return real_encode(vae, pixels)

    monkeypatch.setattr(data_module, "generate_images", generate)
    monkeypatch.setattr(data_module, "encode_pixels", encode)
    monkeypatch.setattr(data_module, "generation_dtype", lambda pipe, r: torch.bfloat16)
    half = data_module.prepare_data(pipeline, recipe, tmp_path, base_fingerprint=fingerprint, progress=False)
    assert half.cache_dir != full.cache_dir  # different data, its own cache
    assert seen == [("generate", torch.bfloat16, True), ("encode", torch.float32, False)]
    assert pipeline.unet.dtype == torch.float32
    for key, value in pipeline.unet.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the same images up to half-precision sampling noise
    assert (half.target_latents - full.target_latents).abs().mean() < 0.25 * full.target_latents.abs().mean()


def test_adversarial_training_adds_the_found_prompts_to_the_target(pipeline, tmp_path, monkeypatch):
    """One adversarial round: train, attack (two prompts), train again on the original prompts plus the found ones."""
    import functools

    from dt_lora import search

    # a short search: this test is about the rounds, not about how strong their attack is
    monkeypatch.setattr(search, "AttackSettings", functools.partial(search.AttackSettings, steps=4, candidates=8))
    recipe = tiny_recipe(**{"train.adversarial_rounds": "1", "train.adversarial_prompts": "2"})
    result = train_adapter(recipe, tmp_path / "adv.safetensors", cache_dir=tmp_path / "cache", pipeline=pipeline,
                           progress=False)
    concept = read_adapter(result.adapter).concepts[0]
    original = recipe.target_prompts
    found = [p for p in concept["prompts"] if p not in original]
    assert concept["prompts"][: len(found)] == found and set(original) <= set(concept["prompts"])
    assert len(found) == 2 and all(any(p.endswith(" " + source) for source in original) for p in found)
    assert all("circle" not in p.split()[:5] for p in found)  # five free tokens, none the concept's word
    assert concept["train"]["adversarial_rounds"] == 1
    assert not (tmp_path / "adv.safetensors.work").exists()  # rounds' adapters and records removed
    assert not getattr(pipeline.unet, "peft_config", None)


def test_adversarial_training_resumes_with_the_recorded_prompts(pipeline, tmp_path, monkeypatch):
    """A round whose found prompts were recorded before an interruption is not attacked again."""
    import json

    def refuse(*args, **kwargs):
        raise AssertionError("attacked again")

    monkeypatch.setattr("dt_lora.search.find_prompts", refuse)
    work = tmp_path / "adv.safetensors.work"
    work.mkdir()
    (work / "round-0.json").write_text(json.dumps({"round": 0, "found": ["zebra zebra a red circle"]}))
    recipe = tiny_recipe(**{"train.adversarial_rounds": "1"})
    result = train_adapter(recipe, tmp_path / "adv.safetensors", cache_dir=tmp_path / "cache", pipeline=pipeline,
                           progress=False)
    assert read_adapter(result.adapter).concepts[0]["prompts"][0] == "zebra zebra a red circle"
    with pytest.raises(RecipeError, match="adversarial"):
        tiny_recipe(**{"train.adversarial_rounds": "-1"})
