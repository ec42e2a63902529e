"""`dt-lora eval` and `dt-lora demo`: the report's numbers, pictures and files, on the toy world."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers.lora import demo_folder

from dt_lora.cli import main
from dt_lora.recipes import recipe_path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`dt-lora demo` with the shipped shields in its folder, as a first run would have left them: it
    merges, bakes and evaluates (training is test_shipped_shields'). → (folder, what it printed, report.json)"""
    import contextlib
    import io

    from dt_lora.recipes import adapter_path

    out = demo_folder(tmp_path_factory.mktemp("demo") / "demo", [adapter_path(n) for n in ("toy-circle", "toy-red")])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "-o", str(out), "-q"]) == 0
    return out, printed.getvalue(), json.loads((out / "report" / "report.json").read_text())


@pytest.mark.slow  # bakes and evaluates two recipes
def test_demo_bakes_evaluates_and_reuses_its_shields(demo):
    out, printed, report = demo
    assert "shields reused" in printed and f"report: {out / 'report' / 'report.html'}" in printed
    for name in ("toy-circle", "toy-red"):
        shield = report["shields"][name]
        assert shield["target"]["base"] >= 0.9 and shield["target"]["shielded"] <= 0.10  # the bar of test_shielding
        assert shield["paraphrases"]["base"] >= 0.9 and shield["paraphrases"]["shielded"] <= 0.20
        base, shielded = shield["preservation"]["base"], shield["preservation"]["shielded"]
        assert set(base) == {"square", "triangle", "cross", "star", "green", "blue", "yellow", "purple"}
        for concept, rate in shielded.items():  # the stacking bar: ≥ 0.9 × base for all else
            assert rate >= 0.9 * base[concept], (name, concept, rate)
    provenance = json.loads((out / "toy-shielded" / "dt_lora.json").read_text())
    assert [c["name"] for c in provenance["concepts"]] == ["toy-circle", "toy-red"]


@pytest.mark.slow  # the demo's report
def test_report_shows_what_dt_adds_over_a_negative_prompt(demo):
    _, _, report = demo
    assert report["conditions"] == ["base", "shielded", "negative prompt"]
    # a negative prompt ("circle, red") does not take the circle away
    assert report["shields"]["toy-circle"]["target"]["negative prompt"] >= 0.5
    # anchors move less between base and shielded than between two seeds
    assert 0 <= report["image_distance"]["shielded"] < report["image_distance"]["seed_to_seed"] < 0.1


@pytest.mark.slow  # the demo's report
def test_report_files_show_every_prompt_before_and_after(demo):
    from PIL import Image

    from dt_lora.recipe import load_recipe

    out = demo[0] / "report"
    prompts = set()
    for name in ("toy-circle", "toy-red"):
        recipe = load_recipe(recipe_path(name))
        prompts |= {*recipe.target_prompts, *recipe.target.paraphrases, *recipe.anchor_prompts}
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == len(prompts)
    # each strip: 3 conditions × 2 images of 32 px at scale 3, with two 8-px gaps
    assert Image.open(grids[0]).size == (3 * 2 * 96 + 2 * 8, 96)
    page = (out / "report.html").read_text()
    linked = set(re.findall(r"src='(grids/[^']+)'", page))
    assert linked == {f"grids/{g.name}" for g in grids}
    assert "a picture showing a red circle" in page  # paraphrases are listed with their pictures
    assert (out / "overview.png").is_file() and "overview.png" in (out / "report.md").read_text()


def test_eval_refuses_what_it_cannot_score(toy_shields, tmp_path, capsys):
    recipe = tmp_path / "mickey.toml"
    shutil.copy(recipe_path("sd15-character-mickey"), recipe)
    code = main(["eval", "--recipe", str(recipe), "--adapter", str(toy_shields["circle"]), "-o", str(tmp_path / "r")])
    assert code == 2
    assert "toy evaluator cannot score it; pass --clip" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


SMALL_RECIPE = """
name = "toy-circle-small"
[target]
prompts = ["a red circle", "a photo of a blue circle"]
paraphrases = ["there is a green circle here"]
[anchors]
prompts = ["a red square", "a photo of a blue star", "a yellow triangle"]
"""


@pytest.mark.slow  # draws for captions and metrics
def test_clip_scorer_and_quality_metrics_plumbing(toy_shields, clip_folder, inception_weights, tmp_path):
    """CLIP zero-shot scoring and FID / IS / CLIP score on a captions file, with stand-in weights."""
    from PIL import Image

    from dt_lora.toy import world

    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL_RECIPE)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(["a red circle", "a green star", "a blue cross", "a yellow square"] * 3))
    references = tmp_path / "real"
    references.mkdir()
    for i, image in enumerate(world.sample(12, 7)[0]):
        Image.fromarray(image).save(references / f"{i}.png")
    out = tmp_path / "report"
    assert main(["eval", "--recipe", str(recipe), "--adapter", str(toy_shields["circle"]), "--clip", str(clip_folder),
                 "--captions", str(captions), "--reference-images", str(references), "--metrics", "fid,is,clip",
                 "--inception-weights", str(inception_weights), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scorer"] == "CLIP zero-shot"
    shield = report["shields"]["toy-circle-small"]
    assert set(shield["preservation"]["base"]) == {"a red square", "a photo of a blue star", "a yellow triangle"}
    assert all(0 <= rate <= 1 for rate in shield["target"].values())
    quality = report["quality"]
    assert set(quality) == {"FID (captions)", "IS (captions)", "IS std", "CLIP score (captions)"}
    for metric in ("FID (captions)", "IS (captions)", "CLIP score (captions)"):
        assert set(quality[metric]) == {"base", "shielded"}
        assert all(value == value and abs(value) < 1e6 for value in quality[metric].values()), metric  # finite
    assert quality["IS (captions)"]["base"] >= 1
    assert "FID (captions)" in (out / "report.md").read_text()


def test_missing_metric_weights_fail_before_generating(toy_shields, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n")
    code = main(["eval", "--recipe", str(recipe_path("toy-circle")), "--adapter", str(toy_shields["circle"]),
                 "--captions", str(captions), "--metrics", "is,clip", "-o", str(tmp_path / "r")])
    assert code == 2
    error = capsys.readouterr().err
    assert "--inception-weights" in error and "--clip" in error
    assert not (tmp_path / "r").exists()


def test_a_recipe_without_anchors_reports_targets_only(toy_shields, tmp_path):
    recipe = tmp_path / "bare.toml"
    recipe.write_text('name = "bare"\n[target]\nprompts = ["a red circle"]\n[train]\npreservation = "none"\n')
    assert main(["eval", "--recipe", str(recipe), "--adapter", str(toy_shields["circle"]), "-o", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["shields"]["bare"]["target"]["shielded"] <= 0.5 < report["shields"]["bare"]["target"]["base"]
    assert report["image_distance"] == {} and "Image distance" not in (tmp_path / "r" / "report.md").read_text()


def test_a_damaged_adapter_fails_before_anything_is_drawn(tmp_path, capsys, monkeypatch):
    def no_drawing(*args, **kwargs):
        raise AssertionError("generated images before checking the adapter")

    monkeypatch.setattr("dt_lora.evaluate.generate_images", no_drawing)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code = main(["eval", "--recipe", str(recipe_path("toy-circle")), "--adapter", str(damaged), "-o", str(tmp_path / "r")])
    assert code == 2
    assert "damaged.safetensors: not a readable .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_one_eval_seed_for_the_toy_world_eval_and_its_command():
    from dt_lora import evaluate, toy
    from dt_lora.cli import build_parser
    from dt_lora.toy import quality

    args = build_parser().parse_args(["eval", "--recipe", "r.toml", "--adapter", "a.safetensors", "-o", "out"])
    assert evaluate.EVAL_SEED is toy.EVAL_SEED is quality.EVAL_SEED
    assert args.seed == toy.EVAL_SEED
    assert evaluate.evaluate_shields.__kwdefaults__["seed"] == toy.EVAL_SEED


def test_report_renders_an_extra_section_in_every_file(tmp_path):
    import numpy as np

    from dt_lora.evaluate import EvalReport, ReportSection, write_report

    report = EvalReport("toy evaluator", ["base", "shielded"],
                        {"r": {"target": {"base": 1.0, "shielded": 0.0}, "paraphrases": {"base": None, "shielded": None},
                               "preservation": {"base": {}, "shielded": {}}}},
                        {}, {"seed": 1, "steps": 2, "guidance": 5.0})
    report.sections.append(ReportSection("Attacks", "Rates under attack.\n\n| attack | rate |\n|---|---|\n| paraphrase | 0.25 |",
                                         {"paraphrase": 0.25}))
    drawn = {c: np.zeros((2, 32, 32, 3), np.uint8) for c in report.conditions}
    groups = {"r": {"target": ["a red circle"], "paraphrases": [], "anchors": []}}
    write_report(report, tmp_path, groups, {"a red circle": 0}, drawn, 2)

    md = (tmp_path / "report.md").read_text()
    assert md.index("| **r**: target drawn | 1.00 | 0.00 |") < md.index("## Attacks\n\nRates under attack.") < md.index(
        "| paraphrase | 0.25 |") < md.index("## r: target")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Attacks</h2><p>Rates under attack.</p><table" in page and "<td>paraphrase</td><td>0.25</td>" in page
    assert json.loads((tmp_path / "report.json").read_text())["sections"] == {"Attacks": {"paraphrase": 0.25}}
