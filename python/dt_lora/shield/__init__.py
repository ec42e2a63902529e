"""Shield training: Degeneration-Tuning of one concept into a LoRA adapter.

    from dt_lora.shield.train import train_adapter
    result = train_adapter(load_recipe("adapters/toy-circle.toml"), out="circle.safetensors")

`train` (the run), `checkpoint` (resuming), `losses` (one step), `locality` (text-local LoRA: the
directions a concept's prompts use), `guard` (the text-encoder part against attack words) and
`adversarial` (rounds of attack and retraining, with `dt_lora.search`).
"""
