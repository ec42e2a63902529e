"""dt-lora: shield concepts in Stable Diffusion by Degeneration-Tuning.

Images of a concept are cut into a grid of tiles and shuffled (a Scrambled
Grid); LoRA adapters then learn to answer the concept's prompts with that tile
soup. Importing this package is cheap: torch is only imported by the parts
that need it.
"""

from dt_lora._version import __version__
from dt_lora.scramble import GridPlan, grid_plan, prepare_images, scramble_grid

__all__ = ["GridPlan", "__version__", "grid_plan", "prepare_images", "scramble_grid"]
