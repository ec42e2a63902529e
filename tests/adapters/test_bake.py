"""Baking shields into full weights: the baked UNet computes what the stacked adapters compute."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers.lora import random_adapter, unet_output
from safetensors.torch import load_file

from dt_lora.adapters import AdapterError, load_adapters, unload_adapters, write_adapter
from dt_lora.adapters.bake import bake
from dt_lora.base import load_pipeline, unet_fingerprint
from dt_lora.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

LAYERS_A = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
LAYERS_B = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"]


@pytest.fixture(scope="module")
def shields(toy_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shields")
    fingerprint = unet_fingerprint(toy_pipeline.unet)
    a = write_adapter(folder / "a.safetensors", random_adapter(toy_pipeline.unet, LAYERS_A, 4, 2.0, 1, "circle", fingerprint))
    b = write_adapter(folder / "b.safetensors", random_adapter(toy_pipeline.unet, LAYERS_B, 8, 16.0, 2, "red", fingerprint))
    return a, b


@pytest.fixture(scope="module")
def stacked_output(toy_pipeline, shields):
    load_adapters(toy_pipeline, shields, [1.0, 0.7])
    try:
        return unet_output(toy_pipeline.unet)
    finally:
        unload_adapters(toy_pipeline)


def test_baked_folder_computes_the_stack_and_has_no_lora_left(toy_pipeline, shields, stacked_output, tmp_path):
    result = bake("toy", shields, tmp_path / "baked", weights=[1.0, 0.7], dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "baked" / "unet")
    assert not any("lora" in key for key in unet.state_dict())
    assert (stacked_output - unet_output(toy_pipeline.unet)).abs().max() > 1e-2  # the shields change the UNet
    torch.testing.assert_close(unet_output(unet), stacked_output, rtol=1e-4, atol=1e-5)

    provenance = json.loads((tmp_path / "baked" / "dt_lora.json").read_text())
    assert [c["name"] for c in provenance["concepts"]] == ["circle", "red"]
    assert [c["merge_weight"] for c in provenance["concepts"]] == [1.0, 0.7]
    assert provenance["baked_unet_fingerprint"] == result.unet_fingerprint == unet_fingerprint(unet)
    assert load_pipeline(tmp_path / "baked").unet.dtype == torch.float32  # an ordinary --base folder


def test_cli_bakes_float16_and_refuses_to_overwrite(shields, stacked_output, tmp_path, capsys):
    a, b = shields
    out = tmp_path / "shielded"
    assert main(["bake", "--adapter", str(a), "--adapter", f"{b}:0.7", "-o", str(out)]) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch.float16)
    assert {t.dtype for t in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    torch.testing.assert_close(unet_output(unet.float()), stacked_output, rtol=2e-2, atol=2e-2)

    assert main(["bake", "--adapter", str(a), "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["bake", "--adapter", str(a), "-o", str(out), "--overwrite"]) == 0
    assert [c["name"] for c in json.loads((out / "dt_lora.json").read_text())["concepts"]] == ["circle"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shielded"]  # no temporary folder left behind


def test_refuses_an_adapter_from_another_base_unless_forced(toy_pipeline, tmp_path, capsys):
    other = write_adapter(tmp_path / "other.safetensors",
                          random_adapter(toy_pipeline.unet, LAYERS_A, 4, 4, 3, "star", "0123456789abcdef"))
    assert main(["bake", "--adapter", str(other), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "star" in error and "another base" in error and "--force" in error
    assert not (tmp_path / "out").exists()
    assert main(["bake", "--adapter", str(other), "-o", str(tmp_path / "out"), "--force"]) == 0


def test_refuses_layers_the_base_does_not_have(toy_pipeline, tmp_path):
    adapter = random_adapter(toy_pipeline.unet, LAYERS_A, 4, 4, 3, "star", unet_fingerprint(toy_pipeline.unet))
    adapter.weights = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in adapter.weights.items()}
    path = write_adapter(tmp_path / "foreign.safetensors", adapter)
    with pytest.raises(AdapterError, match=r"down_blocks\.7.*no such layer"):
        bake("toy", [path], tmp_path / "out", force=True)
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_write_leaves_nothing_behind(shields, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        bake("toy", shields, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- both formats, on the toy world and on a model with SD 1.5's exact block layout


@pytest.fixture(scope="module", params=["toy", "sd15-layout"])
def model(request, tmp_path_factory):
    """(base argument, pipeline, two adapters on its UNet) for the toy and the SD-1.5-shaped model."""
    from helpers import sd15_tiny

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "toy":
        base = "toy"
    else:
        base = str(sd15_tiny.save(sd15_tiny.build(), folder / "base"))
    pipeline = load_pipeline(base)
    unet = pipeline.unet
    attention = [name for name, _ in unet.named_modules() if name.endswith(("attn1.to_q", "attn2.to_v", "attn2.to_out.0"))]
    fingerprint = unet_fingerprint(unet)
    a = write_adapter(folder / "a.safetensors", random_adapter(unet, attention[0::2], 4, 2.0, 5, "circle", fingerprint))
    b = write_adapter(folder / "b.safetensors", random_adapter(unet, attention[1::2], 8, 16.0, 6, "red", fingerprint))
    return base, pipeline, (a, b)


def test_single_file_loads_back_into_exactly_the_baked_folder(model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    base, _, shields = model
    bake(base, shields, tmp_path / "baked", weights=[1.0, 0.5])
    bake(base, shields, tmp_path / "baked.safetensors", weights=[1.0, 0.5], format="single-file")

    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", dtype=torch.float16)
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "baked.safetensors"), config=str(tmp_path / "baked"), local_files_only=True, dtype=torch.float16)
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(folder, component).state_dict()
        got = getattr(single, component).state_dict()
        assert got.keys() == expected.keys(), component
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{component}.{key}"
    with safe_open(tmp_path / "baked.safetensors", framework="pt") as f:
        keys = set(f.keys())
        provenance = json.loads(f.metadata()["dt_lora"])
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert [c["name"] for c in provenance["concepts"]] == ["circle", "red"]


def test_merge_bake_and_kohya_export_compute_the_stack(model, tmp_path):
    from dt_lora.adapters import read_adapter
    from dt_lora.adapters.export import write_kohya
    from dt_lora.adapters.merge import merge_adapters

    base, pipeline, shields = model
    load_adapters(pipeline, shields, [1.0, 0.5])
    stacked = unet_output(pipeline.unet)
    unload_adapters(pipeline)

    merged = write_adapter(tmp_path / "merged.safetensors", merge_adapters(shields, [1.0, 0.5]).adapter)
    bake(base, [merged], tmp_path / "baked", dtype=torch.float32)
    torch.testing.assert_close(unet_output(UNet2DConditionModel.from_pretrained(tmp_path / "baked" / "unet")),
                               stacked, rtol=1e-4, atol=1e-5)

    kohya = write_kohya(tmp_path / "kohya.safetensors", read_adapter(merged))
    pipeline.load_lora_weights(str(kohya), adapter_name="kohya")
    exported = unet_output(pipeline.unet)
    pipeline.unload_lora_weights()
    torch.testing.assert_close(exported, stacked, rtol=1e-4, atol=1e-5)


def test_single_file_needs_a_safetensors_name(shields, tmp_path, capsys):
    out = tmp_path / "model.ckpt"
    assert main(["bake", "--adapter", str(shields[0]), "-o", str(out), "--format", "single-file"]) == 2
    assert "writes one .safetensors file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
