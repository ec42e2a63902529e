"""Stacking and merging shield adapters: the merged file computes what the stack computes."""

from __future__ import annotations

import pytest
import torch
from helpers.lora import random_adapter, unet_output

from dt_lora.adapters import AdapterError, load_adapters, read_adapter, unload_adapters, write_adapter
from dt_lora.adapters.merge import merge_adapters
from dt_lora.base import unet_fingerprint
from dt_lora.cli import main

# the test adapters touch a few layers only, which peft reports when diffusers loads them
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

LAYERS_A = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
LAYERS_B = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"]


@pytest.fixture
def two_adapters(toy_pipeline, tmp_path):
    fingerprint = unet_fingerprint(toy_pipeline.unet)  # generate and export check the adapters fit the base
    a = write_adapter(tmp_path / "a.safetensors", random_adapter(toy_pipeline.unet, LAYERS_A, 4, 2.0, 1, "circle", fingerprint))
    b = write_adapter(tmp_path / "b.safetensors", random_adapter(toy_pipeline.unet, LAYERS_B, 8, 16.0, 2, "red", fingerprint))
    return a, b


def test_exact_merge_equals_the_stack_on_unet_outputs(toy_pipeline, two_adapters, tmp_path):
    a, b = two_adapters
    base = unet_output(toy_pipeline.unet)
    load_adapters(toy_pipeline, [a, b], [1.0, 0.7])
    stacked = unet_output(toy_pipeline.unet)
    unload_adapters(toy_pipeline)

    merged = merge_adapters([a, b], [1.0, 0.7])
    path = write_adapter(tmp_path / "merged.safetensors", merged.adapter)
    assert read_adapter(path).rank == 12 and read_adapter(path).alpha == 12
    load_adapters(toy_pipeline, [path])
    got = unet_output(toy_pipeline.unet)
    unload_adapters(toy_pipeline)

    assert (stacked - base).abs().max() > 1e-2  # the adapters do change the UNet
    torch.testing.assert_close(got, stacked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_output(toy_pipeline.unet), base)  # unloading restores the base
    assert [c["name"] for c in read_adapter(path).concepts] == ["circle", "red"]


def test_compact_merge_reports_its_error_and_is_exact_at_full_rank(toy_pipeline, two_adapters):
    a, b = two_adapters
    exact = merge_adapters([a, b], rank=12)  # every layer's summed delta has rank ≤ 12
    assert exact.overall_error < 1e-5
    truncated = merge_adapters([a, b], rank=2)
    assert set(truncated.layer_errors) == set(LAYERS_A) | set(LAYERS_B)
    shared = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # rank 4 + rank 8 there
    assert 0.05 < truncated.layer_errors[shared] < 1
    assert truncated.adapter.rank == 2 and truncated.adapter.alpha == 2


def test_merge_refuses_different_bases_unless_forced(toy_pipeline, tmp_path):
    a = write_adapter(tmp_path / "a.safetensors", random_adapter(toy_pipeline.unet, LAYERS_A, 4, 4, 1, "x", "base-one"))
    b = write_adapter(tmp_path / "b.safetensors", random_adapter(toy_pipeline.unet, LAYERS_B, 4, 4, 2, "y", "base-two"))
    with pytest.raises(AdapterError, match="different base models.*--force"):
        merge_adapters([a, b])
    assert merge_adapters([a, b], force=True).adapter.rank == 8


def test_merge_refuses_incompatible_layers(toy_pipeline, tmp_path):
    good = random_adapter(toy_pipeline.unet, LAYERS_A, 4, 4, 1, "x")
    bad = random_adapter(toy_pipeline.unet, LAYERS_A, 4, 4, 2, "y")
    bad.weights[f"{LAYERS_A[0]}.lora_B.weight"] = torch.zeros(7, 4)
    a = write_adapter(tmp_path / "a.safetensors", good)
    b = write_adapter(tmp_path / "b.safetensors", bad)
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapters([a, b])


def test_merge_cli(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--rank", "3"]) == 0
    printed = capsys.readouterr().out
    assert "relative error: worst layer" in printed and read_adapter(out).rank == 3
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(a.read_bytes()[:50])
    assert main(["merge", str(truncated), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a readable .safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_generate_cli_stacks_adapters(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    out = tmp_path / "images"
    code = main(["generate", "a red circle", "-o", str(out), "--adapter", str(a), "--adapter", f"{b}:0.5",
                 "-n", "2", "--steps", "4"])
    assert code == 0 and sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    assert main(["generate", "a red circle", "-o", str(out), "-n", "1", "--steps", "2"]) == 2


def test_kohya_export_keeps_alpha_and_draws_the_same(toy_pipeline, two_adapters, tmp_path):
    from safetensors import safe_open

    a, _ = two_adapters  # rank 4, alpha 2: a converter that writes alpha = rank would double the scale
    out = tmp_path / "a_kohya.safetensors"
    assert main(["export", "--format", "kohya", str(a), "-o", str(out)]) == 0
    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight" in keys
    assert alpha.item() == 2.0

    load_adapters(toy_pipeline, [a])
    original = unet_output(toy_pipeline.unet)
    unload_adapters(toy_pipeline)
    toy_pipeline.load_lora_weights(str(out), adapter_name="kohya")
    exported = unet_output(toy_pipeline.unet)
    toy_pipeline.unload_lora_weights()
    torch.testing.assert_close(exported, original, rtol=1e-4, atol=1e-5)
