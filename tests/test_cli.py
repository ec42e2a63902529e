"""Tests for the dt-lora command line (in-process and as a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.reference import image_tiles
from PIL import Image

import dt_lora
from dt_lora.cli import main
from dt_lora.io import atomic_write
from dt_lora.scramble import scramble_grid

SAMPLES = Path(__file__).parent / "data" / "samples"


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dt_lora", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def in_dir(tmp_path: Path) -> Path:
    """The committed samples plus a grayscale PNG, an RGBA PNG and a JPEG."""
    folder = tmp_path / "in"
    shutil.copytree(SAMPLES, folder)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 48), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_scramble_folder(in_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "out"
    assert main(["scramble", str(in_dir), str(out_dir), "--grid", "4", "--seed", "0"]) == 0
    sources = sorted(p for p in in_dir.iterdir() if p.suffix in (".png", ".jpg"))
    written = sorted(f"{p.stem}.png" for p in sources)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*written, "dt_lora.json"])
    # the marker lists what dt-lora wrote, so a later --overwrite may replace exactly those files
    assert json.loads((out_dir / "dt_lora.json").read_text())["files"] == written
    for index, src in enumerate(sources):
        before, after = read(src), read(out_dir / f"{src.stem}.png")
        assert after.shape == before.shape and after.dtype == np.uint8
        assert not np.array_equal(before, after), src.name
        assert sorted(image_tiles(after, 4, 4)) == sorted(image_tiles(before, 4, 4)), src.name
        # Image i of the name-sorted folder is image i of the run.
        hwc = before if before.ndim == 3 else before[..., None]
        expected = scramble_grid(np.ascontiguousarray(hwc), 4, 0, layout="NHWC", offset=index)
        np.testing.assert_array_equal(after, expected.reshape(after.shape))
    assert "wrote 8 scrambled image(s)" in capsys.readouterr().out


def test_reproducible_and_seeded(in_dir: Path, tmp_path: Path) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(["scramble", str(in_dir), str(tmp_path / name), "--seed", seed, "--grid", "2x4", "--flips"]) == 0
    house = [read(tmp_path / name / "house.png") for name in "abc"]
    np.testing.assert_array_equal(house[0], house[1])
    assert not np.array_equal(house[0], house[2])


def test_no_derange_and_grid_one(in_dir: Path, tmp_path: Path) -> None:
    assert main(["scramble", str(in_dir), str(tmp_path / "o"), "--grid", "1", "--no-derange", "--flips"]) == 0
    np.testing.assert_array_equal(read(tmp_path / "o" / "tree.png"), read(in_dir / "tree.png"))


def test_refuses_to_overwrite(in_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "out"
    assert main(["scramble", str(in_dir), str(out_dir)]) == 0
    first = read(out_dir / "boat.png")
    capsys.readouterr()
    assert main(["scramble", str(in_dir), str(out_dir), "--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and "Traceback" not in err
    np.testing.assert_array_equal(read(out_dir / "boat.png"), first)
    assert main(["scramble", str(in_dir), str(out_dir), "--seed", "9", "--overwrite"]) == 0
    assert not np.array_equal(read(out_dir / "boat.png"), first)
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize(
    "setup, fragments",
    [
        ("missing", ["does not exist"]),
        ("empty", ["no PNG or JPEG"]),
        ("bad_size", ["odd.png", "30x32", "not divisible"]),
        ("corrupt", ["cannot read image", "broken.png"]),
    ],
)
def test_bad_input_exits_2(setup: str, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    in_dir = tmp_path / "in"
    if setup != "missing":
        in_dir.mkdir()
    if setup == "bad_size":
        Image.new("RGB", (32, 32)).save(in_dir / "fine.png")
        Image.new("RGB", (32, 30)).save(in_dir / "odd.png")
    if setup == "corrupt":
        (in_dir / "broken.png").write_bytes(b"not a png")
    assert main(["scramble", str(in_dir), str(tmp_path / "out"), "--grid", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dt-lora scramble: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_arguments_are_usage_errors(in_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["scramble", str(in_dir), str(tmp_path / "o"), "--grid", "x"])
    assert info.value.code == 2


def test_version_and_help_subprocess(tmp_path: Path) -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dt-lora {dt_lora.__version__}"
    top = run_cli("--help")
    assert top.returncode == 0 and "scramble" in top.stdout
    sub = run_cli("scramble", "--help")
    assert sub.returncode == 0
    for option in ("IN_DIR", "OUT_DIR", "--grid", "--seed", "--flips", "--no-derange", "--overwrite"):
        assert option in sub.stdout
    missing = run_cli("scramble", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_the_libraries_own_messages_show_only_with_verbose(tmp_path: Path) -> None:
    """diffusers' loading bars and info lines are not the user's to act on: silent unless -v (either place)."""
    quiet = run_cli("generate", "a red circle", "-o", str(tmp_path / "quiet"), "-n", "1", "--steps", "2")
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading pipeline components" not in quiet.stderr and "Loading weights" not in quiet.stderr
    assert "generate" in quiet.stderr and "wrote 1 image" in quiet.stdout  # dt-lora's own progress stays
    verbose = run_cli("generate", "a red circle", "-o", str(tmp_path / "verbose"), "-n", "1", "--steps", "2", "-v")
    assert verbose.returncode == 0 and "Loading pipeline components" in verbose.stderr
    assert run_cli("-v", "recipes").returncode == 0


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


# ---- shipped recipes (`dt_lora.recipes`, `dt-lora recipes`)

CHECKOUT_RECIPES = Path(__file__).resolve().parents[1] / "adapters"


def test_recipes_lists_every_shipped_recipe_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no adapters/ here: the package's own recipes must be found
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bases = {line.split()[0]: line.split()[1] for line in lines}
    assert set(bases) == {path.stem for path in CHECKOUT_RECIPES.glob("*.toml")}
    assert bases["toy-circle"] == "toy"
    assert bases["sd15-style-vangogh"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    circle = next(line for line in lines if line.startswith("toy-circle"))
    assert "25 target prompts, e.g. 'a red circle'; shield shipped" in circle
    assert "shield shipped" not in next(line for line in lines if line.startswith("sd15-style-vangogh"))


def test_recipe_path_takes_a_shipped_name_or_a_file(tmp_path, monkeypatch):
    from dt_lora.recipes import recipe_path

    monkeypatch.chdir(tmp_path)
    shipped = recipe_path("toy-circle")
    assert shipped.read_bytes() == (CHECKOUT_RECIPES / "toy-circle.toml").read_bytes()
    assert recipe_path("toy-circle.toml") == shipped
    (tmp_path / "toy-circle.toml").write_text('name = "mine"\n')
    assert recipe_path("toy-circle.toml") == Path("toy-circle.toml")  # the user's own file comes first
    with pytest.raises(FileNotFoundError, match="'toy-circel' is neither a file nor a shipped recipe .*toy-circle"):
        recipe_path("toy-circel")


def test_adapter_arguments_take_a_shipped_shields_name(tmp_path, monkeypatch):
    from dt_lora.cli import build_parser

    monkeypatch.chdir(tmp_path)
    shipped = CHECKOUT_RECIPES / "toy-circle.safetensors"
    args = build_parser().parse_args(["generate", "--adapter", "toy-circle:0.5", "--adapter", "toy-red", "x", "-o", "o"])
    assert [(path.read_bytes(), weight) for path, weight in args.adapter] == [
        (shipped.read_bytes(), 0.5), ((CHECKOUT_RECIPES / "toy-red.safetensors").read_bytes(), 1.0)]
    assert build_parser().parse_args(["export", "toy-circle", "-o", "k"]).adapter.read_bytes() == shipped.read_bytes()
    (tmp_path / "toy-circle").write_bytes(b"mine")  # the user's own file comes first
    assert build_parser().parse_args(["merge", "toy-circle", "toy-cirle", "-o", "m"]).adapters == [
        Path("toy-circle"), Path("toy-cirle")]  # and a name that ships nothing stays the path it is


@pytest.mark.parametrize("args, refusal", [
    (["generate", "x", "--steps", "0", "-o", "o"], "--steps: must be from 1 to 1,000, got 0"),  # was a ZeroDivisionError
    (["eval", "--recipe", "toy-circle", "--adapter", "toy-circle", "--steps", "0", "-o", "o"],
     "--steps: must be from 1 to 1,000, got 0"),  # was silently the recipe's steps
    (["attack", "--recipe", "toy-circle", "--adapter", "toy-circle", "--steps", "-1", "-o", "o"],
     "--steps: must be from 1 to 1,000, got -1"),
    (["generate", "x", "-n", "0", "-o", "o"], "-n/--num-images: must be from 1 to 100,000, got 0"),
    (["merge", "toy-circle", "toy-red", "--rank", "0", "-o", "m.safetensors"], "--rank: must be from 1 to 1,000,000, got 0"),
    (["merge", "toy-circle", "toy-red", "--weights", "1,abc", "-o", "m.safetensors"],
     "--weights: expected comma-separated finite numbers, got '1,abc'"),  # was "invalid <lambda> value"
])
def test_bad_counts_and_weights_are_refused_before_any_work(args, refusal, tmp_path, monkeypatch, capsys):
    from dt_lora.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dt_lora.base.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: argument {refusal}")
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_weight_that_is_no_number_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from dt_lora.cli import build_parser

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # was "adapter file not found", after loading the base
        build_parser().parse_args(["generate", "a red circle", "--adapter", "toy-circle:abc", "-o", "out"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("toy-circle:abc: the weight after ':' must be a number, got 'abc'")
    (tmp_path / "my:shield.safetensors").write_bytes(b"x")  # a file whose name has a colon is still that file
    parsed = build_parser().parse_args(["generate", "--adapter", "my:shield.safetensors", "x", "-o", "o"])
    assert parsed.adapter == [(Path("my:shield.safetensors"), 1.0)]


def test_train_takes_a_shipped_recipe_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the name resolves, and the run stops at the missing base model: nothing is generated or trained
    assert main(["train", "toy-circle", "--base", str(tmp_path / "no-model")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["train", "toy-circel"]) == 2
    err = capsys.readouterr().err
    assert "neither a file nor a shipped recipe" in err and "Traceback" not in err


def test_the_wheel_takes_every_recipe_and_shipped_shield_into_the_package():
    """pyproject's wheel `include` reaches each recipe and adapter in adapters/, through the package's link, at
    the place `dt_lora.recipes` reads them from (a wheel pattern is a path inside python-source, and so in the wheel)."""
    import tomllib

    from dt_lora.recipes import RECIPES_DIR

    root = Path(__file__).resolve().parents[1]
    maturin = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["maturin"]
    source = root / maturin["python-source"]
    patterns = [entry["path"] for entry in maturin["include"] if entry.get("format") == "wheel"]
    assert not any(any(root.glob(pattern)) for pattern in patterns)  # else newer maturin would take the root's files
    assert {path.name for pattern in patterns for path in source.glob(pattern)} == {
        path.name for suffix in ("toml", "safetensors") for path in CHECKOUT_RECIPES.glob(f"*.{suffix}")}
    assert {Path(pattern).parent for pattern in patterns} == {Path(RECIPES_DIR.parent.name, RECIPES_DIR.name)}
