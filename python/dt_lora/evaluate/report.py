"""Rendering an `EvalReport`: report.json, report.md, report.html, overview.png and one picture per prompt.

The summary table comes first, then any extra `ReportSection`s (a measurement beyond the base →
shielded comparison adds one: `report.sections.append(ReportSection(title, markdown, data))`), then
the pictures, prompt group by prompt group.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dt_lora.base.generate import image_grid
from dt_lora.io import atomic_write


@dataclass
class ReportSection:
    """One extra part of the report: its title, its body in markdown (paragraphs and pipe tables, which
    the HTML page renders too) and its numbers, stored in report.json under "sections" → title."""

    title: str
    markdown: str
    data: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    scorer: str
    conditions: list[str]
    shields: dict[str, dict]  # recipe name → {"target": {condition: rate}, "paraphrases": …, "preservation": …}
    distance: dict[str, float]  # "shielded" (base vs shielded) and "seed_to_seed" (base vs base, other seed)
    settings: dict
    quality: dict = field(default_factory=dict)  # FID / IS / CLIP score per condition, when asked for
    sections: list[ReportSection] = field(default_factory=list)  # extra parts, rendered after the summary
    attack: object = None  # attack.AttackResult, when eval was asked to attack (also one of `sections`)

    def as_dict(self) -> dict:
        out = {"scorer": self.scorer, "conditions": self.conditions, "shields": self.shields,
               "image_distance": self.distance, "settings": self.settings, "quality": self.quality}
        if self.sections:
            out["sections"] = {section.title: section.data for section in self.sections}
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
          f"{images_per_prompt} images per prompt.\n", report.table()]
    page = [f"<h1>dt-lora evaluation</h1><p>{html.escape(md[1])}</p>", markdown_table_to_html(report.table()),
            f"<p>{html.escape(report.distance_line()) if report.distance else ''}</p>"]
    for section in report.sections:
        md.append(f"\n## {section.title}\n\n{section.markdown}")
        page.append(f"<h2>{html.escape(section.title)}</h2>{_markdown_to_html(section.markdown)}")
    md += ["", "![overview: first prompts of each shield and its anchors](overview.png)"]
    page.append("<img src='overview.png'>")
    for title, rows in sections:
        md.append(f"\n## {title}\n\nEach picture: {columns}, left to right.\n")
        md += [f"- {prompt}<br>![{prompt}]({path})" for prompt, path in rows]
        page.append(f"<h2>{html.escape(title)}</h2><p>Each row: {html.escape(columns)}, left to right.</p><table>")
        page += [f"<tr><td>{html.escape(prompt)}</td><td><img src='{path}'></td></tr>" for prompt, path in rows]
        page.append("</table>")
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
    from PIL import Image

    labels: dict[str, str] = {}  # picture → its first label (recipes share anchors)
    for title, section in sections:
        if not title.endswith("paraphrases"):
            for prompt, path in section[:per_section]:
                labels.setdefault(path, f"{title}: {prompt}")
    if not labels:
        return
    canvas = labelled_strips([(label, Image.open(out_dir / path).convert("RGB")) for path, label in labels.items()],
                             conditions)
    with atomic_write(out_dir / "overview.png") as f:
        canvas.save(f, format="PNG")


def labelled_strips(rows: list, conditions: list[str]):
    """One picture of (label, PIL strip) rows: each label left of its strip, the conditions named above
    equal-width columns of the strips."""
    from PIL import Image, ImageDraw

    strips = [strip for _, strip in rows]
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
    return canvas


def markdown_table_to_html(table: str) -> str:
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = ["<tr>" + "".join(f"<td>{html.escape(c.strip().replace('**', ''))}</td>" for c in row) + "</tr>"
             for row in rows]
    return "<table border=1 cellspacing=0>" + "".join(cells) + "</table>"


def _markdown_to_html(text: str) -> str:
    """A section's markdown as HTML: pipe tables as tables, other blocks as escaped paragraphs."""
    out = []
    for block in text.strip().split("\n\n"):
        if block.lstrip().startswith("|"):
            out.append(markdown_table_to_html(block))
        elif block.strip():
            out.append(f"<p>{html.escape(block.strip())}</p>")
    return "".join(out)
