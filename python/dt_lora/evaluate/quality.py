"""General image quality on a captions file (FID, IS, CLIP score) for `dt-lora eval --captions`: see
`dt_lora.evaluate.metrics`, which computes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class QualityRequest:
    """General image quality on a captions file (COCO-style), for real models: see `metrics.py`."""

    captions: list[str]
    metrics: tuple[str, ...] = ("fid", "is", "clip")
    reference_images: str | Path | None = None  # folder of real images, for FID
    inception_weights: str | Path | None = None
    clip_model: str | Path | None = None

    def check(self) -> None:
        from dt_lora.evaluate.metrics import check_weights

        if "fid" in self.metrics and self.reference_images is None:
            raise ValueError("FID needs real images to compare with: pass --reference-images DIR (or leave fid "
                             "out of --metrics)")
        check_weights(self.metrics, inception_weights=self.inception_weights, clip_model=self.clip_model)

    def measure(self, drawn: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """metric → condition → value."""
        from dt_lora.evaluate.metrics import quality_metrics

        table: dict[str, dict[str, float]] = {}
        for condition, images in drawn.items():
            values = quality_metrics(images, self.captions, metrics=self.metrics,
                                     reference_images=self.reference_images,
                                     inception_weights=self.inception_weights, clip_model=self.clip_model)
            for metric, value in values.items():
                table.setdefault(QUALITY_NAMES.get(metric, metric), {})[condition] = value
        return table


QUALITY_NAMES = {"fid": "FID (captions)", "is": "IS (captions)", "is_std": "IS std", "clip": "CLIP score (captions)"}
