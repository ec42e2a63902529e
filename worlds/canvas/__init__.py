"""Build code of the canvas world that ships in `dt_lora.canvas`: the model's training (`training/`) and its
card (`python -m worlds.canvas.build`). Run from a checkout; nothing in the installed package imports it."""
