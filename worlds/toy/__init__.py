"""Build code of the toy world that ships in `dt_lora.toy`: the models' training (`training/`), their
card (`python -m worlds.toy.build`) and the shipped toy shields (`python -m worlds.toy.shields`).
Run from a checkout; nothing in the installed package imports it."""
