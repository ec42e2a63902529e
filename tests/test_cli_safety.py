"""What the command line promises about the user's files (issue 12): `--overwrite` replaces only what
dt-lora wrote, pickled weights are refused unless trusted, a damaged input is one line and exit 2 with
nothing half-written, leftovers of a killed write are swept, and exit codes mean one thing each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dt_lora import errors
from dt_lora.cli import main
from dt_lora.io import OUTPUT_MARKER, atomic_directory, atomic_write, check_output, is_dt_lora_file, remove_stale_temps

# the test adapter touches a few layers only, which peft reports when diffusers loads it
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")

RECIPE = Path(__file__).resolve().parents[1] / "adapters" / "toy-circle.toml"
LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
          "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]


@pytest.fixture(scope="module")
def adapter(toy_pipeline, tmp_path_factory) -> Path:
    from helpers.lora import random_adapter

    from dt_lora.adapters import write_adapter
    from dt_lora.base import unet_fingerprint

    folder = tmp_path_factory.mktemp("adapter")
    return write_adapter(folder / "a.safetensors",
                         random_adapter(toy_pipeline.unet, LAYERS, 4, 2.0, 1, "circle", unet_fingerprint(toy_pipeline.unet)))


def user_folder(path: Path) -> Path:
    """A folder of the user's: one file dt-lora never wrote."""
    path.mkdir(parents=True)
    (path / "holiday.jpg").write_bytes(b"the user's photo")
    return path


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dt-lora {command}: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- --overwrite: only what dt-lora wrote


def test_bake_overwrite_refuses_a_folder_dt_lora_did_not_write(adapter, tmp_path, capsys):
    out = user_folder(tmp_path / "mine")
    assert main(["bake", "--adapter", str(adapter), "-o", str(out), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err, "bake")
    assert str(out) in line and OUTPUT_MARKER in line
    assert (out / "holiday.jpg").read_bytes() == b"the user's photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left either

    # an empty folder holds nothing to lose: it may be used without --overwrite
    (tmp_path / "empty").mkdir()
    assert main(["bake", "--adapter", str(adapter), "-o", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()
    # and a baked folder is dt-lora's: --overwrite replaces it
    assert main(["bake", "--adapter", str(adapter), "-o", str(tmp_path / "empty"), "--overwrite"]) == 0


def test_bake_single_file_overwrite_refuses_a_file_dt_lora_did_not_write(adapter, tmp_path, capsys):
    from safetensors.numpy import save_file

    out = tmp_path / "model.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, out)  # some other tool's checkpoint
    before = out.read_bytes()
    assert main(["bake", "--adapter", str(adapter), "-o", str(out), "--format", "single-file", "--overwrite"]) == 2
    assert "is not a file dt-lora wrote" in one_error_line(capsys.readouterr().err, "bake")
    assert out.read_bytes() == before


def test_eval_overwrite_refuses_a_folder_dt_lora_did_not_write(adapter, tmp_path, capsys):
    out = user_folder(tmp_path / "mine")
    assert main(["eval", "--recipe", str(RECIPE), "--adapter", str(adapter), "-o", str(out), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err, "eval")
    assert str(out) in line and OUTPUT_MARKER in line
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


SMALL_RECIPE = """
name = "toy-circle-small"
[target]
prompts = ["a red circle"]
[anchors]
prompts = ["a red square"]
"""


def test_eval_writes_a_marked_report_and_overwrite_replaces_it(adapter, tmp_path, capsys):
    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL_RECIPE)
    out = tmp_path / "report"
    out.mkdir()  # an empty folder is free to use
    args = ["eval", "--recipe", str(recipe), "--adapter", str(adapter), "-o", str(out), "--images-per-prompt", "2",
            "--steps", "2"]
    assert main(args) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "eval" and (out / "report.json").is_file()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    (out / "grids" / "stale.png").write_bytes(b"from an older report")  # one grid more than this report draws
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    (out / OUTPUT_MARKER).write_text(json.dumps({**marker, "contents": [*marker["contents"], "grids/stale.png"]}))
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "grids" / "stale.png").exists()  # replaced whole, not mixed with the old report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "small.toml"]  # no temporary folder left


@pytest.mark.parametrize("command", ["merge", "export"])
def test_file_outputs_overwrite_only_dt_lora_files(command, adapter, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_text("the user's notes")
    args = [command, str(adapter), "-o", str(out)]
    assert main(args) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err, command)
    assert main([*args, "--overwrite"]) == 2
    assert "not a file dt-lora wrote" in one_error_line(capsys.readouterr().err, command)
    assert out.read_text() == "the user's notes"

    out.unlink()
    assert main(args) == 0 and is_dt_lora_file(out)
    assert main([*args, "--overwrite"]) == 0  # its own earlier output: replaced


@pytest.mark.parametrize("command", ["merge", "export"])
def test_file_outputs_create_missing_folders(command, adapter, tmp_path):
    out = tmp_path / "new" / "folder" / "out.safetensors"  # the export said "No such file …/.out.safetensors….tmp"
    assert main([command, str(adapter), "-o", str(out)]) == 0 and is_dt_lora_file(out)
    assert [p.name for p in out.parent.iterdir()] == ["out.safetensors"]  # no temporary file left


def test_train_overwrite_refuses_a_file_dt_lora_did_not_write(tmp_path, capsys):
    out = tmp_path / "shield.safetensors"
    out.write_text("the user's notes")
    assert main(["train", str(RECIPE), "-o", str(out), "--overwrite", "-q"]) == 2
    assert "not a file dt-lora wrote" in one_error_line(capsys.readouterr().err, "train")
    assert out.read_text() == "the user's notes"


def test_generate_overwrite_replaces_only_images_dt_lora_wrote(adapter, tmp_path, capsys):
    out = tmp_path / "images"
    generate = ["generate", "a red circle", "-o", str(out), "--steps", "2", "-n", "2"]
    assert main(generate) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["files"] == ["000000.png", "000001.png"]
    (out / "000002.png").write_bytes(b"the user's picture")
    capsys.readouterr()
    assert main([*generate, "--overwrite", "--seed", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "000002.png" in line and "not written by dt-lora" in line
    assert (out / "000002.png").read_bytes() == b"the user's picture"
    assert main([*generate, "--overwrite"]) == 0  # both its own


def test_scramble_overwrite_replaces_only_images_dt_lora_wrote(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), name == "a" and "red" or "blue").save(src / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "b.png")  # the user's b.png, in the way
    before = (out / "b.png").read_bytes()
    assert main(["scramble", str(src), str(out), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err, "scramble")
    assert "b.png" in line and "not written by dt-lora" in line
    assert (out / "b.png").read_bytes() == before and not (out / "a.png").exists()


def test_check_output_kinds(tmp_path):
    check_output(tmp_path / "missing", False, kind="adapter")
    check_output(tmp_path / "missing", False, kind="model")
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.OutputInTheWay, match="is not a file"):
        check_output(tmp_path / "dir", True, kind="adapter")
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.OutputInTheWay, match="is not a folder"):
        check_output(tmp_path / "file", True, kind="model")
    with pytest.raises(errors.OutputInTheWay, match="pass --overwrite"):
        check_output(tmp_path / "file", False, kind="adapter")
    assert errors.exit_code(errors.OutputInTheWay("x")) == errors.EXIT_USER


# ---------------------------------------------------------------- damaged inputs, killed writes


def truncated_png(path: Path) -> Path:
    """A valid PNG cut right after its header: signature, IHDR and a few bytes of image data."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: 8 + 25 + 40])
    return path


def test_scramble_truncated_png_is_one_line_exit_2_and_writes_nothing(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "a.png")  # sorted first: would be written before the bad one
    truncated_png(src / "b.png")
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-m", "dt_lora", "scramble", str(src), str(out)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 2
    line = one_error_line(child.stderr, "scramble")
    assert str(src / "b.png") in line and "cannot read image" in line
    assert not out.exists()


def test_stale_temporaries_of_a_killed_write_are_swept_by_the_next_run(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".x.png.99999999.deadbeef.tmp"  # pid 99999999 is beyond any pid_max: not running
    stale.write_bytes(b"half a png")
    stale_dir = out / ".baked.99999999.0123abcd.tmp"  # what a killed atomic_directory leaves
    (stale_dir / "unet").mkdir(parents=True)
    live = out / f".y.png.{os.getpid()}.cafef00d.tmp"  # a write still in progress
    live.write_bytes(b"being written")
    mine = ["notes.tmp", ".x.png.99999999.deadbeef.tmp.bak", ".x.png.99999999.DEADBEEF.tmp", "x.png.99999999.deadbeef.tmp"]
    for name in mine:
        (out / name).write_text("the user's")
    assert main(["scramble", str(src), str(out)]) == 0
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists()
    for name in mine:
        assert (out / name).read_text() == "the user's", name
    assert remove_stale_temps(out) == []  # nothing more to sweep


def test_atomic_directory_leaves_the_old_folder_when_the_new_one_fails(tmp_path):
    out = tmp_path / "made"
    with atomic_directory(out, kind="report", command="test") as folder:
        pass
    with pytest.raises(RuntimeError), atomic_directory(out, kind="report", command="test", overwrite=True) as folder:
        (folder / "partial").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made"]
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER]
    with atomic_write(out / "a.txt", "w") as f:  # atomic_write still works inside
        f.write("a")


# ---------------------------------------------------------------- pickled base weights


@pytest.fixture(scope="module")
def pickled_base(toy_pipeline, tmp_path_factory) -> Path:
    """The toy pipeline saved with pickled .bin weights (as old diffusers folders are)."""
    folder = tmp_path_factory.mktemp("pickled") / "base"
    toy_pipeline.save_pretrained(folder, safe_serialization=False)
    # (transformers writes the text encoder as safetensors whatever it is told; the UNet and VAE are pickled)
    assert not list((folder / "unet").glob("*.safetensors")) and list((folder / "unet").glob("*.bin"))
    return folder


def test_a_base_folder_with_pickled_weights_only_is_refused_naming_the_flag(pickled_base, tmp_path, capsys,
                                                                             monkeypatch):
    from dt_lora.base import load_pipeline

    monkeypatch.delenv("DT_LORA_ALLOW_PICKLE", raising=False)
    with pytest.raises(errors.UnsafeWeights, match=r"unet has pickled weights only.*--allow-pickle"):
        load_pipeline(pickled_base)
    out = tmp_path / "images"
    assert main(["generate", "a red circle", "-o", str(out), "--base", str(pickled_base), "-n", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert str(pickled_base) in line and "--allow-pickle" in line and "DT_LORA_ALLOW_PICKLE" in line
    assert not out.exists()

    # trusted: the flag, or the environment variable for commands without it
    assert main(["generate", "a red circle", "-o", str(out), "--base", str(pickled_base), "-n", "1", "--steps", "2",
                 "--allow-pickle"]) == 0
    monkeypatch.setenv("DT_LORA_ALLOW_PICKLE", "1")
    assert load_pipeline(pickled_base).unet is not None


# ---------------------------------------------------------------- exit codes


@pytest.mark.parametrize("raised, code, shown", [
    (ValueError("bad value"), 2, "bad value"),
    (FileNotFoundError("no such file: x"), 2, "no such file: x"),
    (errors.UserError("bad input"), 2, "bad input"),
    (errors.RuntimeFailure("diverged"), 1, "diverged"),
    (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), 1, "CUDA out of memory."),
    (OSError(28, "No space left on device"), 1, "No space left on device"),
    (MemoryError(), 1, "out of memory"),
])
@pytest.mark.parametrize("command", [["scramble", "in", "out"], ["merge", "a.safetensors", "-o", "m.safetensors"]])
def test_exit_codes_mean_one_thing_each(command, raised, code, shown, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("dt_lora.scramble.scramble_folder", fail)
    monkeypatch.setattr("dt_lora.adapters.merge.merge_adapters", fail)
    assert main(command) == code
    assert shown in one_error_line(capsys.readouterr().err, command[0])


@pytest.mark.parametrize("command", [["scramble", "in", "out"], ["merge", "a.safetensors", "-o", "m.safetensors"]])
def test_interrupted_is_130_and_one_line(command, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dt_lora.scramble.scramble_folder", interrupt)
    monkeypatch.setattr("dt_lora.adapters.merge.merge_adapters", interrupt)
    assert main(command) == 130
    assert capsys.readouterr().err.strip() == f"dt-lora {command[0]}: interrupted"


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr("dt_lora.scramble.scramble_folder", lambda *a, **k: None + 1)
    with pytest.raises(TypeError):
        main(["scramble", "in", "out"])


# ---------------------------------------------------------------- ownership: only what dt-lora recorded, of that kind


def test_overwrite_never_takes_a_users_file_beside_dt_lora_images(tmp_path, capsys):
    photos = user_folder(tmp_path / "photos")
    assert main(["generate", "a red circle", "-o", str(photos), "-n", "1", "--steps", "2"]) == 0
    assert sorted(p.name for p in photos.iterdir()) == ["000000.png", OUTPUT_MARKER, "holiday.jpg"]
    capsys.readouterr()
    assert main(["bake", "--adapter", "toy-circle", "-o", str(photos), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err, "bake")
    assert str(photos) in line and "folder of images" in line and "not a baked model folder" in line
    assert (photos / "holiday.jpg").read_bytes() == b"the user's photo" and (photos / "000000.png").is_file()


def test_overwrite_replaces_a_baked_folder_only_while_it_holds_only_what_dt_lora_wrote(tmp_path, capsys):
    baked = tmp_path / "baked"
    bake = ["bake", "--adapter", "toy-circle", "-o", str(baked)]
    assert main(bake) == 0
    marker = json.loads((baked / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "model" and "unet/diffusion_pytorch_model.safetensors" in marker["contents"]
    (baked / "unet" / "my-notes.txt").write_text("the user's")
    capsys.readouterr()
    assert main([*bake, "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err, "bake")
    assert str(baked / "unet" / "my-notes.txt") in line and "did not write" in line
    assert (baked / "unet" / "my-notes.txt").read_text() == "the user's"
    (baked / "unet" / "my-notes.txt").unlink()
    assert main([*bake, "--overwrite"]) == 0


@pytest.mark.parametrize("first, second, kind", [
    (["bake", "--adapter", "toy-circle"], ["eval", "--recipe", "toy-circle", "--adapter", "toy-circle"], "a report"),
    (["merge", "toy-circle", "toy-red"], ["export", "toy-circle"], "a kohya LoRA"),
    (["export", "toy-circle"], ["merge", "toy-circle", "toy-red"], "a shield adapter"),
])
def test_overwrite_replaces_only_an_output_of_the_same_kind(first, second, kind, tmp_path, capsys):
    out = tmp_path / ("out" if first[0] == "bake" else "out.safetensors")
    assert main([*first, "-o", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes()
    capsys.readouterr()
    assert main([*second, "-o", str(out), "--overwrite"]) == 2
    assert f"not {kind}" in one_error_line(capsys.readouterr().err, second[0])
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes()) == before


# ---------------------------------------------------------------- the output can be written, before any work


@pytest.mark.parametrize("command", [
    ["train", "toy-circle", "--train-steps", "2"],
    ["generate", "a red circle", "-n", "1"],
    ["bake", "--adapter", "toy-circle"],
    ["merge", "toy-circle", "toy-red"],
])
@pytest.mark.parametrize("where", ["inside a file", "a folder that takes no files"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, where, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for an output that cannot be written")

    monkeypatch.setattr("dt_lora.base.load_pipeline", no_model)
    monkeypatch.setattr("dt_lora.adapters.merge.merge_adapters", no_model)
    monkeypatch.chdir(tmp_path)
    if where == "inside a file":
        (tmp_path / "notes.txt").write_text("the user's")
        out = tmp_path / "notes.txt" / "sub" / "out.safetensors"
    else:
        out = Path("/proc/dt-lora-test/out.safetensors")  # /proc takes no new files, not even root's
    assert main([*command, "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, command[0])
    assert f"cannot write {out}" in line
    assert ("notes.txt is a file, not a folder" in line) if where == "inside a file" else ("does not take new files" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["notes.txt"] if where == "inside a file" else [])


# ---------------------------------------------------------------- finite numbers in and out


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_a_weight_that_is_not_finite_is_refused_by_the_parser(weight, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "a red circle", "--adapter", f"toy-circle:{weight}", "-o", str(tmp_path / "x")])
    assert exit.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "toy-circle", "toy-red", f"--weights={weight},1", "-o", str(tmp_path / "m.safetensors")])
    assert "finite numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", f"--guidance={weight}", "-o", str(tmp_path / "x")])
    assert "--guidance: must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _shipped_with(tmp_path: Path, name: str, *, b_max: float | None = None, alpha: float | None = None) -> Path:
    """toy-circle's file with its lora_B values scaled up to `b_max` or its alpha changed, as a hand-edited
    file would be."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dt_lora.recipes import adapter_path

    with safe_open(adapter_path("toy-circle"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, tensor in tensors.items():
        if "lora_B" in key and b_max is not None:
            tensors[key] = tensor / tensor.abs().max() * b_max
    if alpha is not None:
        config = json.loads(metadata["lora_adapter_metadata"])
        config["unet.lora_alpha"] = alpha
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, tmp_path / name, metadata=metadata)
    return tmp_path / name


@pytest.mark.parametrize("adapter, problem", [
    ("toy-circle:1e308", "beyond the 65504 that float16 holds"),
    ("toy-circle:1e6", "beyond the 65504 that float16 holds"),  # baked, it made 14 float16 tensors inf
    ("huge-b", "beyond the 65504 that float16 holds"),
    ("huge-alpha", "beyond the 65504 that float16 holds"),
    ("zero-alpha", "lora_alpha = 0"),
    ("negative-alpha", "lora_alpha = -2"),
])
def test_an_adapter_that_would_draw_nan_is_refused_before_the_model_loads(adapter, problem, tmp_path, monkeypatch,
                                                                         capsys):
    files = {"huge-b": dict(b_max=3e38), "huge-alpha": dict(alpha=1e308), "zero-alpha": dict(alpha=0),
             "negative-alpha": dict(alpha=-2)}
    if adapter in files:
        adapter = str(_shipped_with(tmp_path, f"{adapter}.safetensors", **files[adapter]))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dt_lora.base.load_pipeline", no_model)
    for command in (["generate", "a red circle", "-o", str(tmp_path / "x"), "-n", "1"],
                    ["bake", "-o", str(tmp_path / "b")]):
        assert main([*command, "--adapter", adapter]) == 2
        assert problem in one_error_line(capsys.readouterr().err, command[0])
    assert main(["merge", adapter.split(":")[0], "toy-red", "-o", str(tmp_path / "m.safetensors")]
                + (["--weights", "1e308,1"] if ":" in adapter else [])) == 2
    assert problem in one_error_line(capsys.readouterr().err, "merge")
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith("-alpha.safetensors")
                and not p.name.startswith("huge")]


def test_a_drawn_nan_is_an_error_not_a_black_image():
    from dt_lora.base.generate import generate_images
    from dt_lora.errors import NonFinite

    class DrawsNan:  # a pipeline whose weights overflow: diffusers hands back NaN where the picture was
        def __call__(self, prompts, **kwargs):
            images = np.full((len(prompts), 8, 8, 3), 0.5, np.float32)
            images[1, 2, 3] = np.nan
            return type("Output", (), {"images": images})

    with pytest.raises(NonFinite, match=r"NaN or inf values in 1 of 2 image\(s\), e.g. 'b' at seed 8"):
        generate_images(DrawsNan(), ["a", "b"], seed=7, steps=1, guidance=1.0)


def test_bake_refuses_a_model_that_is_not_finite_and_writes_nothing(toy_pipeline, tmp_path, capsys):
    import copy

    base = copy.deepcopy(toy_pipeline)
    with torch.no_grad():  # a damaged base: one weight overflowed
        base.unet.conv_in.weight[0, 0, 0, 0] = float("inf")
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "b"
    assert main(["bake", "--base", str(tmp_path / "base"), "--adapter", "toy-circle", "-o", str(out), "--force"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (after diffusers' loading bars)
    assert "the baked model (float16): tensor unet.conv_in.weight holds NaN or inf" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_nothing_dt_lora_writes_holds_nan(tmp_path):
    from dt_lora.adapters import AdapterError, read_adapter, write_adapter
    from dt_lora.adapters.export import write_kohya
    from dt_lora.errors import NonFinite
    from dt_lora.recipes import adapter_path
    from dt_lora.tensorfiles import write_safetensors

    adapter = read_adapter(adapter_path("toy-circle"))
    key = next(iter(adapter.weights))
    adapter.weights[key] = adapter.weights[key].clone()
    adapter.weights[key][0, 0] = float("inf")
    with pytest.raises((AdapterError, NonFinite), match="inf"):  # (write_adapter's own layer check says so first)
        write_adapter(tmp_path / "a.safetensors", adapter)
    with pytest.raises((AdapterError, NonFinite), match="inf"):
        write_kohya(tmp_path / "k.safetensors", adapter)
    with pytest.raises(NonFinite, match=r"x.safetensors: tensor b holds NaN or inf \(1 NaN, 0 inf\); nothing was written"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2), "b": torch.tensor([0.0, float("nan")])})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bounds on sizes


def test_merge_rank_above_the_exact_rank_writes_the_exact_merge_and_says_so(tmp_path, capsys):
    from dt_lora.adapters import read_adapter

    out = tmp_path / "m.safetensors"
    assert main(["merge", "toy-circle", "toy-red", "--rank", "100000", "-o", str(out)]) == 0
    assert "--rank 100000 is not below the exact merge's rank 4: wrote the exact merge" in capsys.readouterr().out
    assert read_adapter(out).rank == 4 and out.stat().st_size < 200_000


@pytest.mark.parametrize("flag, value, problem", [
    ("--seed", "99999999999999999999", "must be from 0 to 2**63 - 1"),
    ("--seed", "-5", "must be from 0 to 2**63 - 1"),
    ("-n", "1000000000000", "must be from 1 to 100,000"),
    ("--steps", "0", "must be from 1 to 1,000"),
    ("--guidance", "nan", "must be a finite number"),
    ("--guidance", "-1", "must be at least 0"),
])
def test_sizes_seeds_and_numbers_are_bounded_by_the_parser(flag, value, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "a red circle", flag, value, "-o", str(tmp_path / "x")])
    assert exit.value.code == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- a foreign LoRA config


def test_an_adapter_config_without_target_modules_is_refused_by_every_command(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dt_lora.recipes import adapter_path

    with safe_open(adapter_path("toy-circle"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["lora_adapter_metadata"] = json.dumps({"unet.r": 2, "unet.lora_alpha": 2.0})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=metadata)
    for command in (["generate", "x", "--adapter", str(bad), "-o", str(tmp_path / "g"), "-n", "1", "--steps", "2"],
                    ["merge", str(bad), "toy-red", "-o", str(tmp_path / "m.safetensors")],
                    ["bake", "--adapter", str(bad), "-o", str(tmp_path / "b")]):
        assert main(command) == 2
        line = one_error_line(capsys.readouterr().err, command[0])
        assert str(bad) in line and "unet.target_modules = None" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
