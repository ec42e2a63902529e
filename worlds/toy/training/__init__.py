"""Build-time training of the toy world: the pipeline (`model`), its evaluator and its ControlNet, and the
model card. `python -m worlds.toy.build` runs them in order; nothing at run time imports this package."""
