"""Several processes under `accelerate launch`: the data is split by shard and equals a one-process run,
the adapter is written once, eval and attack split their drawing and report what one process does, and
a library shares its concepts out, each trained by one process as a single process would.

Two CPU processes form one gloo group with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`
(`--cpu --num_processes 2` starts a single process; see distributed.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dt_lora import distributed, toy
from dt_lora.adapters import read_adapter
from dt_lora.base import unet_fingerprint
from dt_lora.data import prepare_data
from dt_lora.recipe import load_recipe
from dt_lora.shield.checkpoint import Checkpoint, CheckpointError, run_identity

RECIPE = Path(__file__).resolve().parents[1] / "adapters" / "toy-circle.toml"
# two shards of targets (64 + 64) and two of anchors (64 + 8), so that each process makes some; enough
# steps that the plain target prompts mostly fail, so that the attack searches
SMALL = {"target.images": "128", "anchors.images": "72", "train.steps": "100", "train.batch_size": "4"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dt_lora(args: list[str], processes: int, module: tuple[str, ...] = ("-m", "dt_lora"),
            check: bool = True) -> subprocess.CompletedProcess:
    """`dt-lora ARGS` (or another `module`) as `accelerate launch` starts it with `processes` CPU processes
    (or plainly, for 1); with `check`, it must succeed."""
    command = [*distributed.launcher(processes, port=_free_port()), *module, *args]
    env = {**os.environ, **ONE_THREAD, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def overrides() -> list[str]:
    return [arg for key, value in SMALL.items() for arg in ("--" + key.replace(".", "-").replace("_", "-"), value)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    run = dt_lora(["train", str(RECIPE), "-o", str(folder / "circle.safetensors"), "--cache-dir",
                   str(folder / "cache"), "-q", *overrides()], processes=2)
    return folder, run


def test_each_shard_is_made_by_one_process_and_the_data_equals_one_process(two_process_run, tmp_path):
    folder, run = two_process_run
    made = re.findall(r"\[dt-lora\] process (\d)/2 made (\w+) shard (\d+)", run.stdout)
    shards = Counter((kind, int(shard)) for _, kind, shard in made)
    assert shards == {("target", 0): 1, ("target", 1): 1, ("anchors", 0): 1, ("anchors", 1): 1}
    assert {process for process, _, _ in made} == {"0", "1"}  # shard s is process s mod 2's

    recipe = load_recipe(RECIPE, SMALL)
    pipeline = toy.load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: the same kernels, the same bits
    try:
        one = prepare_data(pipeline, recipe, tmp_path / "cache", base_fingerprint=unet_fingerprint(pipeline.unet),
                           progress=False)
    finally:
        torch.set_num_threads(threads)
    two = folder / "cache" / one.cache_dir.name
    files = sorted(p.name for p in one.cache_dir.glob("*.safetensors"))
    assert files == sorted(p.name for p in two.glob("*.safetensors")) and len(files) == 4
    for name in files:
        a, b = load_file(one.cache_dir / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


def test_the_adapter_is_written_once_and_records_the_processes(two_process_run):
    folder, run = two_process_run
    assert run.stdout.count("wrote ") == 1
    assert "2 processes × batch 4 = effective batch 8" in run.stdout
    adapter = read_adapter(folder / "circle.safetensors")
    assert adapter.concepts[0]["train"]["processes"] == 2 and adapter.concepts[0]["train"]["batch_size"] == 4
    assert not (folder / "circle.safetensors.work").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_an_interrupted_two_process_run_resumes_to_the_same_adapter(two_process_run, tmp_path):
    folder, _ = two_process_run
    out = tmp_path / "circle.safetensors"
    # the first 60 steps, then a checkpoint and no adapter, as an interruption leaves it
    dt_lora([str(out), str(folder / "cache"), "60"], processes=2, module=(__file__,))
    assert not out.exists() and (tmp_path / "circle.safetensors.work" / "checkpoint.safetensors").is_file()
    run = dt_lora(["train", str(RECIPE), "-o", str(out), "--cache-dir", str(folder / "cache"), "-q", *overrides()],
                  processes=2)
    assert "resumed from step 60" in run.stdout
    whole, resumed = read_adapter(folder / "circle.safetensors"), read_adapter(out)
    for key in whole.weights:  # the same batches and optimizer state: equal up to summation order
        torch.testing.assert_close(whole.weights[key], resumed.weights[key], rtol=1e-5, atol=1e-6)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    recipe = load_recipe(RECIPE, SMALL)
    two = run_identity(recipe, "f" * 16, "data", processes=2)
    checkpoint = Checkpoint(tmp_path, two)
    checkpoint.write(2, {}, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 0.5)
    assert checkpoint.read().step == 2  # the same number of processes resumes
    with pytest.raises(CheckpointError, match="trained with 2 process.*this run has 1"):
        Checkpoint(tmp_path, run_identity(recipe, "f" * 16, "data", processes=1)).read()
    # one process keeps the identity it always had: checkpoints of earlier versions still resume
    assert "processes" not in run_identity(recipe, "f" * 16, "data")


def without_seconds(value):
    """A report without its timings, the one thing two runs may differ in."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def test_eval_and_attack_split_their_drawing_and_report_what_one_process_does(two_process_run, tmp_path):
    folder, _ = two_process_run
    adapter = str(folder / "circle.safetensors")
    recipe = tmp_path / "circle-few.toml"  # a few prompts of each kind: enough to split over two processes
    recipe.write_text('name = "toy-circle"\n[target]\nprompts = ["a red circle", "a blue circle", "a photo of a green '
                      'circle", "a yellow circle"]\nparaphrases = ["there is a purple circle here"]\n[anchors]\n'
                      'prompts = ["a red square", "a blue star", "a yellow triangle"]\n')
    budget = ["--prompts", "3", "--free-tokens", "2", "--attack-steps", "2", "--candidates", "4", "--soft-steps", "2",
              "--seeds", "2", "-q"]
    evals, attacks = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"eval-{processes}"
        dt_lora(["eval", "--recipe", str(recipe), "--adapter", adapter, "--steps", "4", "-o", str(out)], processes)
        evals[processes] = json.loads((out / "report.json").read_text())
        out = tmp_path / f"attack-{processes}"
        dt_lora(["attack", "--recipe", str(recipe), "--adapter", adapter, "-o", str(out), *budget], processes)
        attacks[processes] = json.loads((out / "report.json").read_text())["attack"]
        assert len(list((out / "attack").glob("*.png"))) == len(attacks[processes]["pictures"]) > 0
    assert evals[1]["shields"] == evals[2]["shields"]
    # float32 sums over images drawn in other batches: equal to float precision, not bit for bit (seen: 1e-6 apart)
    assert evals[1]["image_distance"] == pytest.approx(evals[2]["image_distance"], rel=1e-5)
    assert without_seconds(attacks[1]["concepts"]) == without_seconds(attacks[2]["concepts"])
    assert attacks[1]["pictures"] == attacks[2]["pictures"]


LIBRARY = ("toy-circle", "toy-red", "toy-square")
TINY = ["--target-images", "8", "--anchors-images", "8", "--train-steps", "4", "--train-batch-size", "4",
        "--sampling-steps", "4", "--lora-rank", "2", "--lora-alpha", "2"]


def library(folder: Path, red_images: str | None = None) -> Path:
    """A folder of three toy recipes; `red_images` makes toy-red read its images from that folder."""
    folder.mkdir()
    for name in LIBRARY:
        text = (RECIPE.parent / f"{name}.toml").read_text()
        if red_images is not None and name == "toy-red":
            text = text.replace("[target]\n", f'[target]\nimage_folder = "{red_images}"\n')
        (folder / f"{name}.toml").write_text(text)
    return folder


def train_library(recipes: Path, out: Path, processes: int, check: bool = True) -> subprocess.CompletedProcess:
    return dt_lora(["train", "--library", str(recipes), "-o", str(out), "--cache-dir", str(out / "cache"), *TINY],
                   processes, check=check)


def test_a_library_shares_its_concepts_out_and_a_failing_concept_stops_every_process(tmp_path):
    train_library(library(tmp_path / "recipes"), tmp_path / "one", processes=1)
    missing = tmp_path / "no-such-images"
    # the same library, but toy-red reads a folder that is not there; its own cache, so each process makes
    # its data
    run = train_library(library(tmp_path / "failing", red_images=str(missing)), tmp_path / "two", processes=2,
                        check=False)

    # concept i to process i mod 2, which trains it from its data to its adapter alone: toy-circle and
    # toy-square to process 1, bit for bit what one process trains; toy-red to process 2, where it fails
    assert dict(re.findall(r"\] (toy-\w+): 4 steps .*\(process (\d)/2\)", run.stdout)) == {
        "toy-circle": "1", "toy-square": "1"}
    for name in ("toy-circle", "toy-square"):
        one, two = (read_adapter(tmp_path / run_dir / f"{name}.safetensors") for run_dir in ("one", "two"))
        assert two.concepts[0]["train"]["processes"] == 1
        assert one.weights.keys() == two.weights.keys()
        for key in one.weights:
            assert torch.equal(one.weights[key], two.weights[key]), f"{name}: {key} differs"

    assert run.returncode != 0 and not (tmp_path / "two" / "merged.safetensors").exists()
    # process 1 says why in one line too: the launcher may stop process 2 before it prints its own
    assert f"dt-lora train: error: toy-red: target.image_folder {missing} is not a folder (on process 2 of 2" \
        in run.stderr
    assert "dt_lora/" not in run.stderr  # no traceback from dt-lora (the launcher prints its own)


if __name__ == "__main__":  # launched by test_an_interrupted_two_process_run_resumes_to_the_same_adapter
    from dt_lora.shield.train import train_adapter

    out, cache, steps = sys.argv[1:4]
    train_adapter(load_recipe(RECIPE, SMALL), out, cache_dir=cache, progress=False, stop_after=int(steps))
