"""`dt-lora train` after something went wrong: a diverged run, a hand-edited checkpoint, an adapter that
could not be written at the end. Tiny runs on the toy world, as in test_train.py."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

from dt_lora import data as data_module
from dt_lora.adapters import read_adapter
from dt_lora.base import unet_fingerprint
from dt_lora.errors import exit_code
from dt_lora.recipe import load_recipe
from dt_lora.shield import train as train_module
from dt_lora.shield.checkpoint import CHECKPOINT, Checkpoint, CheckpointError, TrainingDiverged, run_identity
from dt_lora.shield.train import GUARD_FILE, train_adapter

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
TINY = {"target.images": "8", "anchors.images": "8", "train.steps": "3", "train.batch_size": "4",
        "train.checkpoint_every": "1", "sampling.steps": "4", "lora.rank": "4", "lora.alpha": "2",
        "train.optimizer": "adamw"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One data cache for the module: every run here trains on the same images."""
    return tmp_path_factory.mktemp("cache")


def tiny_recipe(**extra):
    return load_recipe(ADAPTERS / "toy-circle.toml", {**TINY, **extra})


def usable(tensors) -> bool:
    """Finite, and within float16's range, where adapters are applied."""
    return all(bool(torch.isfinite(t).all()) and float(t.abs().max()) <= torch.finfo(torch.float16).max
               for t in tensors)


# ---- divergence: nothing diverged is kept, and the command the message gives works


def test_a_diverged_run_keeps_no_checkpoint_and_the_suggested_command_trains(toy_pipeline, tmp_path, cache):
    """At a learning rate of 1e30 the first update sets lora_B to 5e28 while the loss stays finite (the UNet's
    normalisation scales the huge outputs back down); that checkpoint was kept, and a run at a lower rate
    was then refused as another run."""
    out, work = tmp_path / "a.safetensors", tmp_path / "a.safetensors.work"
    with pytest.raises(TrainingDiverged) as error:
        train_adapter(tiny_recipe(**{"train.learning_rate": "1e30"}), out, cache_dir=cache, pipeline=toy_pipeline,
                      progress=False)
    assert not (work / CHECKPOINT).exists() and not out.exists()
    text = str(error.value)
    assert text.startswith("training diverged: ") and "\n" not in text and exit_code(error.value) == 1
    assert "blew up the LoRA weights" in text and "5e+28" in text  # caught at the update, not at a NaN loss
    assert "--train-learning-rate 1e+29" in text and str(work) in text

    # the same command at a lower rate (as `dt-lora train --train-learning-rate` overrides the recipe)
    result = train_adapter(tiny_recipe(**{"train.learning_rate": "1e-3"}), out, cache_dir=cache,
                           pipeline=toy_pipeline, progress=False)
    assert result.resumed_from == 0 and usable(read_adapter(out).weights.values())


def test_divergence_of_the_loss_removes_the_checkpoint_written_before_it(toy_pipeline, tmp_path, cache,
                                                                        monkeypatch):
    """The checkpoint of the steps before the divergence is of no use: resumed, the same batches diverge again."""
    out, work = tmp_path / "a.safetensors", tmp_path / "a.safetensors.work"
    real_accumulate = train_module.accumulate_gradients
    losses = iter([0.5, math.nan])
    monkeypatch.setattr(train_module, "accumulate_gradients", lambda *args: real_accumulate(*args) * 0 + next(losses))
    with pytest.raises(TrainingDiverged) as error:
        train_adapter(tiny_recipe(), out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    assert not (work / CHECKPOINT).exists() and not out.exists()
    text = str(error.value)
    assert "\n" not in text and "loss became nan at step 1" in text
    assert "--train-learning-rate 0.0001 (a tenth of 0.001)" in text and str(work) in text
    assert not getattr(toy_pipeline.unet, "peft_config", None)  # cleaned up on failure too


def identity_of(recipe, pipeline):
    fingerprint = unet_fingerprint(pipeline.unet)
    return run_identity(recipe, fingerprint, data_module.data_key(recipe, fingerprint))


def optimizer_after_one_step(weight: torch.nn.Parameter) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("weight, spoil_optimizer, problem", [
    (float("nan"), False, r"lora\.layer\.lora_B\.weight is nan"),
    (5e28, False, r"lora\.layer\.lora_B\.weight is 5e\+28, beyond"),  # finite, but a diverged run's
    (1.0, True, r"optim\.0/exp_avg_sq is inf"),
])
def test_a_checkpoint_with_unusable_tensors_is_not_written(toy_pipeline, tmp_path, weight, spoil_optimizer,
                                                           problem):
    checkpoint = Checkpoint(tmp_path, identity_of(tiny_recipe(), toy_pipeline))
    good = torch.nn.Parameter(torch.ones(2, 2))
    checkpoint.write(2, {"layer.lora_B.weight": good}, optimizer_after_one_step(good), 0.5)
    before = checkpoint.path.read_bytes()

    bad = torch.nn.Parameter(torch.full((2, 2), weight))
    optimizer = optimizer_after_one_step(bad)
    if spoil_optimizer:
        optimizer.state[bad]["exp_avg_sq"].fill_(math.inf)
    with pytest.raises(TrainingDiverged, match=rf"{CHECKPOINT}: not written, {problem}"):
        checkpoint.write(3, {"layer.lora_B.weight": bad}, optimizer, 0.5)
    assert checkpoint.path.read_bytes() == before  # the last usable one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temporary file left


def test_a_diverged_guard_is_not_kept(toy_pipeline, tmp_path, monkeypatch):
    from dt_lora.adapters import AdapterFile
    from dt_lora.shield import guard

    def diverged_guard(pipeline, recipe, stacked_with, log):
        weights = {"layer.lora_A.weight": torch.ones(8, 4), "layer.lora_B.weight": torch.full((4, 8), math.nan)}
        return {"text_encoder": AdapterFile(weights, {"r": 8, "lora_alpha": 8, "target_modules": ["layer"]})}

    monkeypatch.setattr(guard, "train_guard", diverged_guard)
    monkeypatch.setattr(data_module, "generate_images", lambda *a, **k: pytest.fail("trained after the guard"))
    recipe = tiny_recipe(**{"guard.enabled": "true", "guard.learning_rate": "0.003"})
    with pytest.raises(TrainingDiverged, match=r"context guard diverged \(text_encoder\.layer\.lora_B\.weight is nan\)"
                                               r".*--guard-learning-rate 0\.0003"):
        train_adapter(recipe, tmp_path / "a.safetensors", cache_dir=tmp_path / "cache", pipeline=toy_pipeline,
                      progress=False)
    assert not (tmp_path / "a.safetensors.work" / GUARD_FILE).exists()


# ---- a hand-edited checkpoint is refused as damaged


def edit_checkpoint(path: Path, meta_changes: dict | None = None, tensor_changes: dict | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["dt_lora_checkpoint"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    meta.update(meta_changes or {})
    tensors.update(tensor_changes or {})
    save_file(tensors, path, metadata={"dt_lora_checkpoint": json.dumps(meta)})


def written_checkpoint(folder: Path, pipeline) -> Checkpoint:
    checkpoint = Checkpoint(folder, identity_of(tiny_recipe(), pipeline))
    weight = torch.nn.Parameter(torch.ones(2, 2))
    checkpoint.write(3, {"layer.lora_B.weight": weight}, optimizer_after_one_step(weight), 0.5)
    return checkpoint


@pytest.mark.parametrize("meta, tensors, problem", [
    ({"step": 4}, {}, "step 4 is not one of 0..3, the run's train.steps"),
    ({"step": 999}, {}, "step 999 is not one of 0..3, the run's train.steps"),
    ({"step": -3}, {}, "step -3 is not one of 0..3, the run's train.steps"),
    ({"step": 2.5}, {}, "step 2.5 is not one of 0..3"),
    ({"step": "3"}, {}, "step '3' is not one of 0..3"),
    ({"step": True}, {}, "step True is not one of 0..3"),
    ({"loss": "low"}, {}, "loss 'low' is not a number >= 0"),
    ({"loss": -1.0}, {}, "loss -1.0 is not a number >= 0"),
    ({"scalars": [1, 2]}, {}, "'scalars' is not a table of per-parameter tables"),
    ({"scalars": {"0": 5}}, {}, "'scalars' is not a table of per-parameter tables"),
    ({"scalars": {"x": {}}}, {}, "invalid literal for int()"),
    ({"param_groups": {"lr": 1}}, {}, "'param_groups' is not a list of tables"),
    ({"param_groups": [{"lr": 0.1, "eps": math.nan, "params": [0]}]}, {}, "the optimizer's settings hold NaN or inf"),
    ({}, {"lora.layer.lora_B.weight": torch.full((2, 2), math.inf)}, "lora.layer.lora_B.weight is inf"),
    ({}, {"lora.layer.lora_B.weight": torch.full((2, 2), 5e28)}, "lora.layer.lora_B.weight is 5e+28, beyond"),
    ({}, {"optim.0/exp_avg": torch.full((2, 2), math.nan)}, "optim.0/exp_avg is nan"),
])
def test_a_hand_edited_checkpoint_is_refused_in_one_line(toy_pipeline, tmp_path, meta, tensors, problem):
    checkpoint = written_checkpoint(tmp_path, toy_pipeline)
    edit_checkpoint(checkpoint.path, meta, tensors)
    edited = checkpoint.path.read_bytes()
    with pytest.raises(CheckpointError) as error:
        checkpoint.read()
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{checkpoint.path}: damaged checkpoint (") and problem in text
    assert checkpoint.path.read_bytes() == edited  # left as it is


@pytest.mark.parametrize("step, loss", [(0, None), (3, 0.25), (2, math.nan)])  # NaN: older dt-lora, no step yet
def test_every_step_of_the_run_and_a_missing_loss_are_accepted(toy_pipeline, tmp_path, step, loss):
    checkpoint = written_checkpoint(tmp_path, toy_pipeline)
    edit_checkpoint(checkpoint.path, {"step": step, "loss": loss})
    state = checkpoint.read()
    assert state.step == step
    assert state.loss == loss if loss == 0.25 else math.isnan(state.loss)  # None and NaN: no loss recorded


# ---- the adapter could not be written at the end: the trained weights are kept


def test_a_failed_adapter_write_keeps_the_work_and_the_same_command_writes_it(toy_pipeline, tmp_path, cache,
                                                                              monkeypatch):
    out, work = tmp_path / "a.safetensors", tmp_path / "a.safetensors.work"
    recipe = tiny_recipe(**{"train.checkpoint_every": "100"})  # no checkpoint before the end
    real_write_adapter = train_module.write_adapter
    attempted = []

    def read_only_folder(path, adapter):
        attempted.append(adapter)  # what the uninterrupted run writes
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(train_module, "write_adapter", read_only_folder)
    with pytest.raises(PermissionError) as error:
        train_adapter(recipe, out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    assert str(error.value) == (f"{out}: the adapter could not be written (Permission denied); the trained weights "
                                f"are kept in {work / CHECKPOINT}: run the same command again to write the adapter "
                                f"without training again")
    assert exit_code(error.value) == 2 and not out.exists()
    assert Checkpoint(work, identity_of(recipe, toy_pipeline)).read().step == 3

    monkeypatch.setattr(train_module, "write_adapter", real_write_adapter)
    monkeypatch.setattr(train_module, "accumulate_gradients", lambda *a: pytest.fail("trained again"))
    monkeypatch.setattr(train_module, "prepare_data", lambda *a, **k: pytest.fail("prepared the data again"))
    result = train_adapter(recipe, out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    assert result.adapter == out and result.resumed_from == 3 and result.steps == 3
    written, expected = read_adapter(out), attempted[0]
    assert written.weights.keys() == expected.weights.keys()
    for key in written.weights:
        torch.testing.assert_close(written.weights[key], expected.weights[key], rtol=0, atol=0)
    for concept in (written.concepts[0], expected.concepts[0]):
        concept["train"].pop("seconds", None)
    assert written.concepts[0]["train"] == expected.concepts[0]["train"]
    assert not work.exists()  # cleaned up after success


def test_a_full_disk_at_the_end_is_a_runtime_failure_and_ctrl_c_there_keeps_the_work(toy_pipeline, tmp_path,
                                                                                     cache, monkeypatch):
    def full_disk(path, adapter):
        raise OSError(errno.ENOSPC, "No space left on device")

    out, work = tmp_path / "a.safetensors", tmp_path / "a.safetensors.work"
    monkeypatch.setattr(train_module, "write_adapter", full_disk)
    with pytest.raises(OSError) as error:
        train_adapter(tiny_recipe(), out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    assert type(error.value) is OSError and error.value.errno == errno.ENOSPC  # exit 1, not the user's fault
    assert str(error.value).startswith(f"{out}: the adapter could not be written (No space left on device); "
                                       f"the trained weights are kept in {work / CHECKPOINT}")

    def interrupted(path, adapter):
        raise KeyboardInterrupt

    (work / CHECKPOINT).unlink()  # trained again, and interrupted while the adapter is written
    monkeypatch.setattr(train_module, "write_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_recipe(), out, cache_dir=cache, pipeline=toy_pipeline, progress=False)
    assert Checkpoint(work, identity_of(tiny_recipe(), toy_pipeline)).read().step == 3 and not out.exists()
