"""`python -m bench train`: the in-process worker on the toy UNet, and the shipped SD 1.5 UNet config.

The full bench (one subprocess per configuration, SD 1.5 at 512 px) is far too slow for the suite;
these check that a timed step really trains, and that the SD 1.5 architecture is SD 1.5's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import train as bench


@pytest.fixture(scope="module")
def toy_lora_params():
    """LoRA parameter count for r=8 on the toy UNet's attention projections, counted from the layers."""
    unet = bench.build_unet("toy", "cpu")
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                                                     or name.endswith("to_out.0")):
            total += 8 * (module.in_features + module.out_features)
    assert total > 0
    return total


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_worker_times_a_real_training_step(optimizer, checkpointing, toy_lora_params):
    result = bench.measure("toy", device="cpu", gradient_checkpointing=checkpointing, optimizer=optimizer,
                           steps=1, warmup=0, rank=8)
    assert "error" not in result
    assert math.isfinite(result["steps_per_s"]) and result["steps_per_s"] > 0
    assert result["s_per_step"] == pytest.approx(1 / result["steps_per_s"])
    assert result["peak_bytes"] > 0
    assert result["before_bytes"] is None or 0 < result["before_bytes"] <= result["peak_bytes"]
    assert result["trainable_params"] == toy_lora_params
    # the step moved the LoRA weights; B starts at zero, where weight decay does nothing, so only an
    # applied gradient moves it (Adam's first step moves each weight with a gradient by ~lr = 1e-4)
    assert result["lora_max_change"] > 0
    assert result["lora_B_max_change"] > 1e-5
    assert len(result["losses"]) == 1 and math.isfinite(result["losses"][0])
    json.dumps(result)  # what the subprocess prints must be JSON


def test_worker_reports_errors_as_a_row(capsys):
    assert bench._worker(json.dumps({"model": "nope", "steps": 1})) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(bench.RESULT_TAG)
    row = json.loads(line[len(bench.RESULT_TAG):])
    assert row["model"] == "nope" and "unknown model" in row["error"]


def test_table_shows_failed_rows(capsys):
    rows = [{"model": "sd15", "device": "cpu", "gradient_checkpointing": True, "optimizer": "adamw8bit",
             "error": "RuntimeError: out of memory\nmore detail"}]
    bench.print_table(rows)
    assert "FAILED: RuntimeError: out of memory" in capsys.readouterr().out
    assert "needs a GPU" in bench.target_line(rows, "cpu")
    assert "NOT MET" in bench.target_line(rows, "cuda")


def test_sd15_config_is_sd15_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads(bench.SD15_CONFIG.read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    assert next(unet.parameters()).device == torch.device("meta")
    names = {name for name, _ in unet.named_modules()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 768
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_data_rows_launch_the_processes_they_name(capsys):
    # `accelerate launch --cpu --num_processes 2` would start one process; the row records how many ran
    rows = bench.run_data_rows([2], images=128, device="cpu", timeout=600, threads=1)
    assert "error" not in rows[0], rows[0].get("error")
    assert rows[0]["processes"] == 2 and rows[0]["images"] == 128 and rows[0]["seconds"] > 0
    bench.print_data_table(rows)
    assert "n/a" in capsys.readouterr().out  # no one-process row to compare with
