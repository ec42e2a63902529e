"""The adapter format: malformed adapters are refused, and adapters must fit the base they are used on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.lora import random_adapter, unet_output
from safetensors.torch import save_file

from dt_lora.adapters import (
    LORA_METADATA_KEY,
    AdapterError,
    check_fits,
    load_adapters,
    lora_layers,
    read_adapter,
    unload_adapters,
    write_adapter,
)
from dt_lora.base import unet_fingerprint
from dt_lora.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
          "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
Q = LAYERS[0]


@pytest.fixture(scope="module")
def fingerprint(toy_pipeline):
    return unet_fingerprint(toy_pipeline.unet)


@pytest.fixture
def adapter(toy_pipeline, fingerprint):
    """A well-formed rank-4 adapter on the toy UNet, to damage."""
    return random_adapter(toy_pipeline.unet, LAYERS, 4, 4.0, 1, "circle", fingerprint)


def write_raw(path, adapter):
    """Write `adapter` as write_adapter does, but without its checks: the file a buggy tool could leave."""
    save_file({f"unet.{k}": v.contiguous() for k, v in adapter.weights.items()}, path, metadata={
        "format": "pt",
        LORA_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in adapter.lora_config.items()}),
        "dt_lora": json.dumps({"concepts": adapter.concepts}),
    })
    return path


def error_line(err: str, command: str) -> str:
    """The one-line error the CLI ends with (loading a base model may print progress bars before it)."""
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"dt-lora {command}: error: ") and err.endswith(last + "\n")
    return last


def without_b(adapter):
    del adapter.weights[f"{Q}.lora_B.weight"]


def without_a(adapter):
    del adapter.weights[f"{Q}.lora_A.weight"]


def rank_zero(adapter):
    adapter.weights[f"{Q}.lora_A.weight"] = adapter.weights[f"{Q}.lora_A.weight"][:0]
    adapter.weights[f"{Q}.lora_B.weight"] = adapter.weights[f"{Q}.lora_B.weight"][:, :0]


def metadata_rank_zero(adapter):
    adapter.lora_config["r"] = 0


def inner_mismatch(adapter):
    adapter.weights[f"{Q}.lora_B.weight"] = adapter.weights[f"{Q}.lora_B.weight"][:, :3]


def rank_not_the_config(adapter):
    adapter.weights[f"{Q}.lora_A.weight"] = adapter.weights[f"{Q}.lora_A.weight"][:2]
    adapter.weights[f"{Q}.lora_B.weight"] = adapter.weights[f"{Q}.lora_B.weight"][:, :2]


def nan(adapter):
    adapter.weights[f"{Q}.lora_B.weight"][3, 1] = math.nan


def inf(adapter):
    adapter.weights[f"{Q}.lora_A.weight"][0, 0] = -math.inf


def vector(adapter):
    adapter.weights[f"{Q}.lora_A.weight"] = adapter.weights[f"{Q}.lora_A.weight"].flatten()


def dora(adapter):
    adapter.lora_config["use_dora"] = True


DAMAGE = {  # how → what the one-line error must say
    "A without B": (without_b, rf"unet\.{Q}\.lora_A\.weight has no matching unet\.{Q}\.lora_B\.weight"),
    "B without A": (without_a, rf"unet\.{Q}\.lora_B\.weight has no matching unet\.{Q}\.lora_A\.weight"),
    "rank 0": (rank_zero, rf"unet\.{Q}\.lora_A\.weight is 0×48: rank 0"),
    "metadata rank 0": (metadata_rank_zero, r"unet\.r = 0; the rank must be an integer >= 1"),
    "inner dimensions": (inner_mismatch, rf"unet\.{Q}\.lora_A\.weight is 4×48 and .*lora_B\.weight is 48×3"),
    "rank not the config's": (rank_not_the_config, rf"unet\.{Q}\.lora_A\.weight has rank 2 .* unet\.r = 4"),
    "NaN": (nan, rf"unet\.{Q}\.lora_B\.weight holds 1 NaN and 0 inf"),
    "inf": (inf, rf"unet\.{Q}\.lora_A\.weight holds 0 NaN and 1 inf"),
    "not a matrix": (vector, rf"unet\.{Q}\.lora_A\.weight has shape \(192,\); expected a matrix"),
    "DoRA": (dora, "uses DoRA, which dt-lora does not support"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_malformed_adapter_is_refused_naming_the_tensor(damage, adapter, tmp_path, capsys):
    how, message = DAMAGE[damage]
    how(adapter)
    path = write_raw(tmp_path / "damaged.safetensors", adapter)
    with pytest.raises(AdapterError, match=message) as error:
        read_adapter(path)
    assert str(error.value).startswith(f"{path}: ")
    with pytest.raises(AdapterError, match=message):
        write_adapter(tmp_path / "again.safetensors", adapter)  # dt-lora never writes such a file
    assert not (tmp_path / "again.safetensors").exists()

    out = tmp_path / "kohya.safetensors"
    assert main(["export", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dt-lora export: error:") and "Traceback" not in err
    assert not out.exists()


def test_merge_and_bake_refuse_a_nan_adapter(adapter, tmp_path, capsys):
    nan(adapter)
    path = write_raw(tmp_path / "nan.safetensors", adapter)
    assert main(["merge", str(path), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "NaN" in error_line(capsys.readouterr().err, "merge")
    assert main(["bake", "--adapter", str(path), "-o", str(tmp_path / "baked")]) == 2
    assert f"unet.{Q}.lora_B.weight holds 1 NaN" in error_line(capsys.readouterr().err, "bake")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_lora_layers_yields_every_pair_with_its_scale(adapter):
    layers = lora_layers(adapter)
    assert list(layers) == sorted(LAYERS)
    for layer, lora in layers.items():
        assert lora.A is adapter.weights[f"{layer}.lora_A.weight"] and lora.B is adapter.weights[f"{layer}.lora_B.weight"]
        assert lora.scale == 1.0 and lora.shape == (lora.B.shape[0], lora.A.shape[1])
        torch.testing.assert_close(lora.delta(), lora.B @ lora.A)
    adapter.lora_config["use_rslora"] = True  # peft scales by alpha/√r then
    assert lora_layers(adapter)[Q].scale == 2.0


# ---- adapters must fit the base they are used on


def test_generate_refuses_layers_the_base_does_not_have(adapter, tmp_path, capsys):
    adapter.weights = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in adapter.weights.items()}
    path = write_adapter(tmp_path / "foreign.safetensors", adapter)
    out = tmp_path / "images"
    assert main(["generate", "a red circle", "-o", str(out), "--adapter", str(path), "-n", "1", "--steps", "2"]) == 2
    err = error_line(capsys.readouterr().err, "generate")
    assert f"{path}: adapter layer down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q" in err
    assert "no such layer" in err
    assert not out.exists()


@pytest.mark.parametrize("target, message", [
    # attn2.to_k reads the text encoder's 64 features, not the 48 UNet channels attn1.to_q reads
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "the base's is 48×64"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.norm1", "the base's is a LayerNorm, not a Linear layer"),
])
def test_check_fits_refuses_a_layer_of_another_shape_or_kind(target, message, toy_pipeline, adapter):
    adapter.weights = {f"{target}.lora_A.weight": torch.randn(4, 48), f"{target}.lora_B.weight": torch.randn(48, 4)}
    with pytest.raises(AdapterError, match=rf"^bad\.safetensors: adapter layer {target} \(48×48\) does not fit "
                                           rf"this base: {message}$"):
        check_fits([adapter], toy_pipeline.unet, force=True, sources=["bad.safetensors"])


def test_generate_refuses_an_adapter_trained_on_another_base_unless_forced(toy_pipeline, tmp_path, capsys):
    other = random_adapter(toy_pipeline.unet, LAYERS, 4, 4.0, 1, "star", "0123456789abcdef")
    path = write_adapter(tmp_path / "other.safetensors", other)
    out = tmp_path / "images"
    args = ["generate", "a red star", "-o", str(out), "--adapter", str(path), "-n", "1", "--steps", "2"]
    assert main(args) == 2
    err = error_line(capsys.readouterr().err, "generate")
    assert "star" in err and "another base" in err and "--force" in err
    assert not out.exists()
    assert main(args + ["--force"]) == 0
    assert [p.name for p in out.glob("*.png")] == ["000000.png"]


def test_eval_refuses_an_adapter_of_another_base_before_drawing(toy_pipeline, tmp_path, capsys, monkeypatch):
    def no_drawing(*args, **kwargs):
        raise AssertionError("generated images before checking the adapter fits")

    monkeypatch.setattr("dt_lora.evaluate.generate_images", no_drawing)
    path = write_adapter(tmp_path / "other.safetensors",
                         random_adapter(toy_pipeline.unet, LAYERS, 4, 4.0, 1, "star", "0123456789abcdef"))
    # the shipped recipe by its name, as `train` takes it
    code = main(["eval", "--recipe", "toy-circle", "--adapter", str(path), "-o", str(tmp_path / "r")])
    assert code == 2
    assert "other.safetensors: shield(s) star were trained on another base" in error_line(capsys.readouterr().err, "eval")
    assert not (tmp_path / "r").exists()


def test_load_adapters_fingerprints_the_base_once(toy_pipeline, adapter, tmp_path, monkeypatch):
    import dt_lora.base

    paths = [write_adapter(tmp_path / f"{i}.safetensors", adapter) for i in range(3)]
    calls = []
    fingerprint = dt_lora.base.unet_fingerprint
    monkeypatch.setattr(dt_lora.base, "unet_fingerprint", lambda unet: calls.append(1) or fingerprint(unet))
    load_adapters(toy_pipeline, paths)
    unload_adapters(toy_pipeline)
    assert len(calls) == 1


def test_unplaced_keys_diffusers_reports_are_an_error(toy_pipeline, adapter, tmp_path, monkeypatch, capfd):
    """Should a layer get past check_fits, diffusers' warning that it matched nothing becomes the error."""
    good = write_adapter(tmp_path / "good.safetensors", adapter)
    adapter.weights = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in adapter.weights.items()}
    foreign = write_adapter(tmp_path / "foreign.safetensors", adapter)
    base = unet_output(toy_pipeline.unet)
    monkeypatch.setattr("dt_lora.adapters.check_fits", lambda *args, **kwargs: None, raising=False)
    with pytest.raises(AdapterError, match=r"foreign\.safetensors: diffusers could not apply every layer: .*unexpected "
                                           r"keys.*down_blocks\.7\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"):
        load_adapters(toy_pipeline, [good, foreign])
    assert not toy_pipeline.get_list_adapters()  # the adapters of the failed call are gone again
    torch.testing.assert_close(unet_output(toy_pipeline.unet), base)

    capfd.readouterr()
    load_adapters(toy_pipeline, [good])
    unload_adapters(toy_pipeline)
    err = capfd.readouterr().err
    assert "No LoRA keys" not in err and "unexpected keys" not in err  # the text-encoder notice stays silent


def test_rank_stabilised_adapters_merge_and_export_exactly(toy_pipeline, adapter, tmp_path):
    from dt_lora.adapters.export import write_kohya
    from dt_lora.adapters.merge import merge_adapters

    adapter.lora_config["use_rslora"] = True  # peft's scale is alpha/√r = 2 then, not alpha/r = 1
    path = write_adapter(tmp_path / "rs.safetensors", adapter)
    base = unet_output(toy_pipeline.unet)
    load_adapters(toy_pipeline, [path, path], [1.0, 0.5])
    stacked = unet_output(toy_pipeline.unet)
    unload_adapters(toy_pipeline)
    assert (stacked - base).abs().max() > 1e-2

    # merged rank 8: the merged file must not scale by 8/√8 as well
    merged = write_adapter(tmp_path / "merged.safetensors", merge_adapters([path, path], [1.0, 0.5]).adapter)
    load_adapters(toy_pipeline, [merged])
    torch.testing.assert_close(unet_output(toy_pipeline.unet), stacked, rtol=1e-4, atol=1e-5)
    unload_adapters(toy_pipeline)

    kohya = write_kohya(tmp_path / "kohya.safetensors", read_adapter(path))  # kohya scales by alpha/r
    toy_pipeline.load_lora_weights(str(kohya), adapter_name="kohya")
    exported = unet_output(toy_pipeline.unet)
    toy_pipeline.unload_lora_weights()
    load_adapters(toy_pipeline, [path])
    single = unet_output(toy_pipeline.unet)
    unload_adapters(toy_pipeline)
    torch.testing.assert_close(exported, single, rtol=1e-4, atol=1e-5)
