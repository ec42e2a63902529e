"""Does a shield work? Generate before and after with the same seeds, score, and write a report.

For each recipe, three prompt groups: the target's prompts, its paraphrases (never trained on) and
its anchors (neighbouring concepts that must stay intact). Each is drawn by up to three models with
identical seeds and sampler: `base` (unmodified), `shielded` (base + stacked adapters, or a baked
model) and, optionally, `negative prompt` (base, with the concept as negative prompt: what users
try without DT). Scorers:

  toy   the toy world's evaluator: does an image show the target shape/colour; is an anchor image
        the shape and colour its prompt asks for; distances between its feature vectors
  clip  CLIP zero-shot from a local folder: an image shows the target when the target's label beats
        every anchor prompt; an anchor image is correct when its own prompt wins; CLIP image
        embeddings for distances

Image distance: 1 − cosine similarity of the scorer's features between the base and shielded image
of the same prompt and seed, next to the same distance between two seeds of the base model (how far
apart images of one prompt are anyway).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .generate import generate_images, image_grid
from .io import atomic_write
from .recipe import Recipe

EVAL_SEED = 1_000_000  # far from every seed that training uses
GROUPS = ("target", "paraphrases", "anchors")


class Scorer(Protocol):
    name: str

    def shows_target(self, images: np.ndarray, recipe: Recipe) -> np.ndarray:
        """Per image: does it show the recipe's target concept?"""

    def preservation(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """Per concept named in the prompts: the share of its images drawn correctly."""

    def features(self, images: np.ndarray) -> np.ndarray:
        """One L2-normalised feature vector per image."""


class ToyScorer:
    """The toy world's evaluator."""

    name = "toy evaluator"

    def __init__(self):
        from . import toy

        self.evaluator = toy.load_evaluator()

    @staticmethod
    def concept(recipe: Recipe) -> str:
        """The toy shape or colour every one of the recipe's target prompts names."""
        from .toy import world

        for concept in world.SHAPES + world.COLOURS:
            if all(concept in p.split() for p in recipe.target_prompts):
                return concept
        raise ValueError(f"recipe {recipe.name!r}: its target prompts do not all name one toy shape or colour, "
                         "so the toy evaluator cannot score it; pass --clip with a CLIP model instead")

    def shows_target(self, images, recipe):
        from .toy import world

        concept = self.concept(recipe)
        shapes, colours, _ = self.evaluator.predict(images)
        if concept in world.SHAPES:
            return shapes == world.SHAPES.index(concept)
        return (colours == world.COLOURS.index(concept)) & (shapes != len(world.SHAPES))  # not tile soup

    def preservation(self, images, prompts):
        evaluation = self.evaluator.evaluate(images, prompts)
        return {**evaluation.shape_rates, **evaluation.colour_rates}

    def features(self, images):
        import torch

        from .toy.evaluator import to_pixels

        with torch.no_grad():
            features = self.evaluator.net.features(to_pixels(images))
        return torch.nn.functional.normalize(features, dim=-1).numpy()


class ClipScorer:
    """CLIP zero-shot from a local model folder (transformers `CLIPModel`, safetensors weights)."""

    name = "CLIP zero-shot"

    def __init__(self, folder: str | Path, recipes: Sequence[Recipe]):
        from .metrics import load_clip

        self.model, self.processor = load_clip(folder)
        self.labels = [r.target_prompts[0] for r in recipes] + sorted({p for r in recipes for p in r.anchor_prompts})

    def _embed(self, images=None, texts=None):
        import torch

        with torch.no_grad():
            if texts is not None:
                inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
                out = self.model.get_text_features(**inputs)
            else:
                inputs = self.processor(images=list(images), return_tensors="pt")
                out = self.model.get_image_features(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(out.float(), dim=-1).numpy()

    def _winners(self, images) -> list[str]:
        scores = self.features(images) @ self._embed(texts=self.labels).T
        return [self.labels[i] for i in scores.argmax(1)]

    def shows_target(self, images, recipe):
        return np.array([w == recipe.target_prompts[0] for w in self._winners(images)])

    def preservation(self, images, prompts):
        hits: dict[str, list[bool]] = {}
        for prompt, winner in zip(prompts, self._winners(images)):
            hits.setdefault(prompt, []).append(winner == prompt)
        return {p: float(np.mean(h)) for p, h in hits.items()}

    def features(self, images):
        return self._embed(images=images)


@dataclass
class QualityRequest:
    """General image quality on a captions file (COCO-style), for real models: see `metrics.py`."""

    captions: list[str]
    metrics: tuple[str, ...] = ("fid", "is", "clip")
    reference_images: str | Path | None = None  # folder of real images, for FID
    inception_weights: str | Path | None = None
    clip_model: str | Path | None = None

    def check(self) -> None:
        from .metrics import check_weights

        if "fid" in self.metrics and self.reference_images is None:
            raise ValueError("FID needs real images to compare with: pass --reference-images DIR (or leave fid "
                             "out of --metrics)")
        check_weights(self.metrics, inception_weights=self.inception_weights, clip_model=self.clip_model)

    def measure(self, drawn: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """metric → condition → value."""
        from .metrics import quality_metrics

        table: dict[str, dict[str, float]] = {}
        for condition, images in drawn.items():
            values = quality_metrics(images, self.captions, metrics=self.metrics,
                                     reference_images=self.reference_images,
                                     inception_weights=self.inception_weights, clip_model=self.clip_model)
            for metric, value in values.items():
                table.setdefault(QUALITY_NAMES.get(metric, metric), {})[condition] = value
        return table


QUALITY_NAMES = {"fid": "FID (captions)", "is": "IS (captions)", "is_std": "IS std", "clip": "CLIP score (captions)"}


@dataclass
class EvalReport:
    scorer: str
    conditions: list[str]
    shields: dict[str, dict]  # recipe name → {"target": {condition: rate}, "paraphrases": …, "preservation": …}
    distance: dict[str, float]  # "shielded" (base vs shielded) and "seed_to_seed" (base vs base, other seed)
    settings: dict
    quality: dict = field(default_factory=dict)  # FID / IS / CLIP score per condition, when asked for
    attack: object = None  # attack.AttackResult, when asked for

    def as_dict(self) -> dict:
        out = {"scorer": self.scorer, "conditions": self.conditions, "shields": self.shields,
               "image_distance": self.distance, "settings": self.settings, "quality": self.quality}
        if self.attack is not None:
            out["attack"] = self.attack.as_dict()
        return out

    def table(self) -> str:
        head = "| | " + " | ".join(self.conditions) + " |"
        lines = [head, "|---" * (len(self.conditions) + 1) + "|"]

        def row(label: str, values: dict) -> None:
            lines.append(f"| {label} | " + " | ".join(
                f"{values[c]:.2f}" if values.get(c) is not None else "–" for c in self.conditions) + " |")

        for name, shield in self.shields.items():
            row(f"**{name}**: target drawn", shield["target"])
            row(f"{name}: paraphrases drawn", shield["paraphrases"])
        preserved = {c: _mean([v for s in self.shields.values() for v in s["preservation"][c].values()])
                     for c in self.conditions}
        row("anchors drawn correctly (mean)", preserved)
        concepts = dict.fromkeys(k for s in self.shields.values() for k in s["preservation"][self.conditions[0]])
        for concept in concepts:
            row(f"anchors: {concept}", {c: _mean([s["preservation"][c].get(concept) for s in self.shields.values()])
                                 for c in self.conditions})
        for metric, values in self.quality.items():
            row(metric, values)
        if self.distance:
            lines.append("\n" + self.distance_line())
        return "\n".join(lines)

    def distance_line(self) -> str:
        return (f"Image distance (1 − cosine of {self.scorer} features) on anchor prompts: base → shielded "
                f"{self.distance['shielded']:.3f}; two seeds of the base, for scale, "
                f"{self.distance['seed_to_seed']:.3f}.")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _prompt_groups(recipes: Sequence[Recipe]) -> dict[str, dict[str, list[str]]]:
    """recipe → group → prompts. Anchors that another recipe targets are left out: with several
    shields stacked, "a red square" is a target of the red shield, not an anchor."""
    targeted = {p for r in recipes for p in r.target_prompts + r.target.paraphrases}
    groups = {}
    for recipe in recipes:
        prompts = {"target": recipe.target_prompts, "paraphrases": recipe.target.paraphrases,
                   "anchors": [p for p in recipe.anchor_prompts if p not in targeted]}
        groups[recipe.name] = prompts
    return groups


def evaluate_shields(
    base_pipeline,
    recipes: Sequence[Recipe],
    out_dir: str | Path,
    *,
    adapters: Sequence[Path] = (),
    shielded_pipeline=None,
    scorer: Scorer,
    negative_prompt: str | None = None,
    images_per_prompt: int = 2,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = EVAL_SEED,
    quality: QualityRequest | None = None,
    attack=None,
    progress: bool = True,
) -> EvalReport:
    """Generate, score and write `report.json`, `report.md`, `report.html` and PNG grids to `out_dir`.

    The shielded model is `base_pipeline` with `adapters` stacked, or `shielded_pipeline` (a baked one).
    With `quality`, every condition also draws one image per caption and gets FID / IS / CLIP score.
    With `attack` (attack.AttackSettings), the shield is also attacked (`attack.attack_shields`; the
    negative-prompt baseline too when `negative_prompt` is given) and the report gets an attack section.
    """
    from .adapters import load_adapters, read_adapter, unload_adapters

    for path in adapters:
        read_adapter(path)  # a damaged adapter fails now, not after the base model has drawn everything
    if not recipes:
        raise ValueError("nothing to evaluate: give at least one recipe")
    if bool(adapters) == (shielded_pipeline is not None):
        raise ValueError("give either adapters or a shielded (baked) pipeline, not both and not neither")
    if images_per_prompt < 2:
        raise ValueError("images_per_prompt must be at least 2 (the seed-to-seed distance needs two)")
    steps = steps or recipes[0].sampling.steps
    guidance = guidance if guidance is not None else recipes[0].sampling.guidance
    started = time.perf_counter()

    groups = _prompt_groups(recipes)
    # each distinct prompt is drawn once (recipes share anchors); image j of prompt i is at i*n + j
    position = {p: i for i, p in enumerate(dict.fromkeys(
        p for recipe_groups in groups.values() for group in recipe_groups.values() for p in group))}
    prompts = [p for p in position for _ in range(images_per_prompt)]

    def draw(texts: list[str]) -> dict[str, np.ndarray]:
        """Condition → images of `texts`, every condition with the same seeds."""
        def run(pipeline, negative=None):
            return generate_images(pipeline, texts, seed=seed, steps=steps, guidance=guidance,
                                   negative_prompt=negative, progress=progress)

        images = {"base": run(base_pipeline)}
        if adapters:
            load_adapters(base_pipeline, adapters)
            try:
                images["shielded"] = run(base_pipeline)
            finally:
                unload_adapters(base_pipeline)
        else:
            images["shielded"] = run(shielded_pipeline)
        if negative_prompt:
            images["negative prompt"] = run(base_pipeline, negative_prompt)
        return images

    if quality is not None:
        quality.check()  # missing weights fail now, not after an hour of generating
    drawn = draw(prompts)
    conditions = list(drawn)

    def select(name: str, group: str) -> tuple[np.ndarray, list[str]]:
        chosen = groups[name][group]
        index = [position[p] * images_per_prompt + j for p in chosen for j in range(images_per_prompt)]
        return np.array(index, dtype=int), [p for p in chosen for _ in range(images_per_prompt)]

    shields = {}
    for recipe in recipes:
        result: dict[str, dict] = {"target": {}, "paraphrases": {}, "preservation": {}}
        for condition, images in drawn.items():
            for group in ("target", "paraphrases"):
                index, _ = select(recipe.name, group)
                result[group][condition] = float(scorer.shows_target(images[index], recipe).mean()) if len(index) else None
            index, anchor_prompts = select(recipe.name, "anchors")
            result["preservation"][condition] = scorer.preservation(images[index], anchor_prompts) if len(index) else {}
        shields[recipe.name] = result

    anchor_index = np.unique(np.concatenate([select(r.name, "anchors")[0] for r in recipes]))
    distance = {}
    if len(anchor_index):
        base_features = scorer.features(drawn["base"][anchor_index])
        shielded_features = scorer.features(drawn["shielded"][anchor_index])
        first, second = base_features[0::images_per_prompt], base_features[1::images_per_prompt]
        distance = {"shielded": float(1 - (base_features * shielded_features).sum(1).mean()),
                    "seed_to_seed": float(1 - (first * second).sum(1).mean())}

    settings = {"seed": seed, "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance,
                "negative_prompt": negative_prompt, "adapters": [str(a) for a in adapters],
                "recipes": [r.name for r in recipes], "seconds": round(time.perf_counter() - started, 1)}
    report = EvalReport(scorer.name, conditions, shields, distance, settings)
    if quality is not None:
        report.quality = quality.measure(draw(quality.captions))
    if attack is not None:
        from .attack import attack_shields

        report.attack = attack_shields(
            base_pipeline, recipes, out_dir, adapters=adapters, shielded_pipeline=shielded_pipeline, scorer=scorer,
            negative_prompts={r.name: negative_prompt for r in recipes} if negative_prompt else None,
            settings=attack, steps=steps, guidance=guidance, progress=progress, write_report=False)
    write_report(report, out_dir, groups, position, drawn, images_per_prompt)
    return report


def _strip(images_by_condition: dict[str, np.ndarray], thumbnail: int = 96) -> np.ndarray:
    """One prompt's images, conditions side by side with a gap between them, as one uint8 HWC picture."""
    from PIL import Image

    parts = []
    for images in images_by_condition.values():
        scale = max(1, thumbnail // images.shape[1])
        tile = image_grid(images, columns=len(images), scale=scale)
        if tile.shape[0] > thumbnail:
            tile = np.asarray(Image.fromarray(tile).resize((tile.shape[1] * thumbnail // tile.shape[0], thumbnail)))
        parts += [tile, np.full((tile.shape[0], 8, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def write_report(report: EvalReport, out_dir: str | Path, groups, position: dict[str, int], drawn,
                 images_per_prompt: int) -> Path:
    """report.json, report.md, report.html, overview.png and grids/NNNN.png (one per distinct prompt)."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    for prompt, i in position.items():
        index = slice(i * images_per_prompt, (i + 1) * images_per_prompt)
        with atomic_write(out_dir / f"grids/{i:04d}.png") as f:
            Image.fromarray(_strip({c: images[index] for c, images in drawn.items()})).save(f, format="PNG")
    sections = [(f"{name}: {group}", [(p, f"grids/{position[p]:04d}.png") for p in prompts])
                for name, recipe_groups in groups.items() for group, prompts in recipe_groups.items()]
    _write_overview(out_dir, report.conditions, sections)

    columns = " | ".join(report.conditions)
    md = ["# dt-lora evaluation\n", f"Scored by the {report.scorer}; seeds from {report.settings['seed']}, "
          f"{report.settings['steps']} steps, guidance {report.settings['guidance']}, "
          f"{images_per_prompt} images per prompt.\n", report.table(), "", "![overview: first prompts of each shield and its anchors](overview.png)"]
    page = [f"<h1>dt-lora evaluation</h1><p>{html.escape(md[1])}</p>", _markdown_table_to_html(report.table()),
            f"<p>{html.escape(report.distance_line()) if report.distance else ''}</p>",
            "<img src='overview.png'>"]
    for title, rows in sections:
        md.append(f"\n## {title}\n\nEach picture: {columns}, left to right.\n")
        md += [f"- {prompt}<br>![{prompt}]({path})" for prompt, path in rows]
        page.append(f"<h2>{html.escape(title)}</h2><p>Each row: {html.escape(columns)}, left to right.</p><table>")
        page += [f"<tr><td>{html.escape(prompt)}</td><td><img src='{path}'></td></tr>" for prompt, path in rows]
        page.append("</table>")
    if report.attack is not None:
        from .attack import attack_html, attack_markdown

        md.append("\n" + attack_markdown(report.attack, level=2))
        page.append(attack_html(report.attack))
    with atomic_write(out_dir / "report.md", "w") as f:
        f.write("\n".join(md) + "\n")
    with atomic_write(out_dir / "report.html", "w") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>dt-lora evaluation</title>"
                "<style>body{font-family:sans-serif} td{padding:2px 8px} img{image-rendering:pixelated}</style>"
                + "\n".join(page) + "\n")
    with atomic_write(out_dir / "report.json", "w") as f:
        json.dump(report.as_dict(), f, indent=2)
    return out_dir / "report.html"


def _write_overview(out_dir: Path, conditions: list[str], sections, per_section: int = 3) -> None:
    """overview.png: the first few prompts of each section, one strip per row, conditions labelled."""
    from PIL import Image, ImageDraw

    labels: dict[str, str] = {}  # picture → its first label (recipes share anchors)
    for title, section in sections:
        if not title.endswith("paraphrases"):
            for prompt, path in section[:per_section]:
                labels.setdefault(path, f"{title}: {prompt}")
    rows = [(label, path) for path, label in labels.items()]
    if not rows:
        return
    strips = [Image.open(out_dir / path).convert("RGB") for _, path in rows]
    label_width, header, height = 260, 20, strips[0].height + 4
    width = label_width + max(strip.width for strip in strips)
    canvas = Image.new("RGB", (width, header + height * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    column = strips[0].width // len(conditions)
    for k, condition in enumerate(conditions):
        draw.text((label_width + k * column + 4, 4), condition, fill="black")
    for k, ((label, _), strip) in enumerate(zip(rows, strips)):
        y = header + k * height
        draw.text((4, y + strip.height // 2 - 6), label[:44], fill="black")
        canvas.paste(strip, (label_width, y))
    with atomic_write(out_dir / "overview.png") as f:
        canvas.save(f, format="PNG")


def _markdown_table_to_html(table: str) -> str:
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = ["<tr>" + "".join(f"<td>{html.escape(c.strip().replace('**', ''))}</td>" for c in row) + "</tr>"
             for row in rows]
    return "<table border=1 cellspacing=0>" + "".join(cells) + "</table>"
