"""`python -m bench gpu`: every stage of the GPU check, run on CPU at tiny sizes.

The check itself runs once on a lent GPU; these make sure that run cannot fail on code that was never
executed. The stages run in-process here (the bench runs each in its own process); the whole command, with
its subprocesses, runs in the slow test. CUDA-only tests are skipped where torch sees no GPU.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from bench import gpu
from bench.__main__ import main as bench_main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


def test_tiny_pipeline_has_sd15_layout_and_full_one_sd15_sizes():
    from accelerate import init_empty_weights

    tiny = gpu.build_sd15_pipeline(tiny=True)
    with init_empty_weights():
        full = gpu.build_sd15_pipeline(tiny=False)
    for name in ("unet", "vae", "text_encoder"):
        tiny_keys, full_keys = getattr(tiny, name).state_dict().keys(), getattr(full, name).state_dict().keys()
        assert list(tiny_keys) == list(full_keys), name
    # SD 1.5's sizes: UNet 859.5 M and VAE 83.7 M parameters; CLIP ViT-L/14's text tower, 77 tokens
    assert sum(p.numel() for p in full.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in full.vae.parameters()) == 83_653_863
    config = full.text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (768, 12, 77)
    assert config.vocab_size == len(full.tokenizer)
    assert gpu._image_size(full) == 512 and gpu._image_size(tiny) == 64


@pytest.mark.slow  # trains (a few steps) and generates: about a minute on 2 cores
def test_stages_train_bake_generate_on_the_saved_pipeline(tmp_path):
    """build → `dt-lora train` (split into load, data, train) → `dt-lora bake` → generate, tiny, CPU."""
    work = str(tmp_path)
    built = gpu.run_stage("build", device="cpu", work=work, tiny=True)
    assert "error" not in built, built.get("traceback")
    assert (tmp_path / "sd15-random" / "model_index.json").is_file()
    from dt_lora.base import load_pipeline

    loaded = load_pipeline(tmp_path / "sd15-random")  # the ordinary --base FOLDER path
    assert loaded.tokenizer.model_max_length == 77

    trained = gpu.run_stage("train", device="cpu", work=work, tiny=True)
    assert "error" not in trained, trained.get("traceback")
    assert [p["name"] for p in trained["phases"]] == ["train: load", "train: data", "train: train"]
    assert all(p["seconds"] > 0 and p["peak_allocated_bytes"] is None for p in trained["phases"])
    from dt_lora.adapters import read_adapter

    adapter = read_adapter(tmp_path / f"{gpu.SD15_RECIPE}.safetensors")
    assert adapter.concepts[0]["name"] == gpu.SD15_RECIPE

    attacked = gpu.run_stage("attack", device="cpu", work=work, tiny=True)
    assert "error" not in attacked, attacked.get("traceback")
    assert [p["name"] for p in attacked["phases"]] == ["attack: load", "attack: images", "attack: search"]
    from dt_lora.recipe import load_recipe
    from dt_lora.recipes import recipe_path

    tokenizer = loaded.tokenizer  # the found prompt is decoded tokens: lower case, as the tokenizer spells words
    typed = [tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids)
             for t in load_recipe(recipe_path(gpu.SD15_RECIPE)).target_prompts]
    [found] = attacked["details"]["found"]  # free tokens before one of the recipe's prompts
    assert any(found.endswith(" " + t) and len(found) > len(t) + 8 for t in typed), (found, typed)

    baked = gpu.run_stage("bake", device="cpu", work=work, tiny=True)
    assert "error" not in baked, baked.get("traceback")
    generated = gpu.run_stage("generate", device="cpu", work=work, tiny=True)
    assert "error" not in generated, generated.get("traceback")
    assert generated["details"]["shape"] == [4, 64, 64, 3]
    assert generated["details"]["distinct_images"] == 4 and generated["details"]["pixel_std"] > 1
    assert (tmp_path / "generated.png").is_file()


@pytest.mark.slow  # trains (a few steps) and generates: about a minute on 2 cores
def test_toy_stage_trains_and_evaluates(tmp_path):
    row = gpu.run_stage("toy", device="cpu", work=str(tmp_path), tiny=True)
    assert "error" not in row, row.get("traceback")
    assert [p["name"] for p in row["phases"]] == ["toy: train", "toy: eval"]
    rates = row["details"]["rates"]
    assert rates["target"]["base"] == 1.0  # the toy base draws red when asked; 2 training steps shield nothing
    assert set(rates["anchors"]) == {"base", "shielded"}
    assert "red drawn 1.00 → " in row["phases"][1]["note"]


def test_a_failing_stage_is_a_row_with_its_traceback(tmp_path):
    row = gpu.run_stage("bake", device="cpu", work=str(tmp_path), tiny=True)  # nothing trained to bake
    assert row["stage"] == "bake" and "dt-lora bake exited with 2" in row["error"]
    assert "Traceback" in row["traceback"]
    table = gpu.markdown_table([row, {"stage": "generate", "skipped": "needs bake, which did not run or failed"}])
    assert "| bake | – | – | – | FAILED: RuntimeError: dt-lora bake exited with 2" in table
    assert "| generate | – | – | – | skipped: needs bake" in table


def test_full_size_needs_a_gpu_and_stages_are_checked(capsys):
    if not torch.cuda.is_available():
        assert bench_main(["gpu", "--device", "cpu"]) == 2
        assert "use --tiny" in capsys.readouterr().err
    assert bench_main(["gpu", "--tiny", "--device", "cpu", "--stages", "build,nope"]) == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err


def test_bitsandbytes_wheel_keeps_only_cuda13_and_cpu_kernels(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_cuda132.so", "bitsandbytes/libbitsandbytes_cuda128.so",
             "bitsandbytes/libbitsandbytes_rocm72.so"]
    with zipfile.ZipFile(wheel, "w") as f:
        for name in names:
            f.writestr(name, b"x" * 10)
        f.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{n},sha256=abc,10\n" for n in names))
    gpu._trim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as f:
        kept = set(f.namelist())
        record = f.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == set(names[:4]) | {"bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda128" not in record and "rocm72" not in record and "cuda130" in record


@pytest.mark.slow
def test_whole_check_tiny_on_cpu_writes_json(tmp_path, capsys):
    """The command as the device runs it (one process per stage), at tiny sizes on CPU."""
    out = tmp_path / "gpu.json"
    code = bench_main(["gpu", "--tiny", "--device", "cpu", "--out", str(out), "--deadline", "3000",
                       "--stage-timeout", "1200"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    failures = {r["stage"]: r.get("traceback") or r.get("error") for r in result["stages"] if "error" in r}
    assert code == 0 and not failures, failures
    assert [r["stage"] for r in result["stages"]] == list(gpu.STAGES)
    assert result["tiny"] and result["versions"]["torch"]
    assert "| train: data |" in printed and "| toy: eval |" in printed


@needs_cuda
def test_tiny_check_on_cuda(tmp_path):
    """On a GPU: every stage's CUDA path (fp16 autocast, AdamW8bit, float16 generation) at tiny sizes."""
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--tiny", "--device", "cuda", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["stages"]
    phases = [p for r in rows for p in r.get("phases", [])]
    assert phases and all(p["peak_allocated_bytes"] > 0 for p in phases if p["name"] != "bake")
