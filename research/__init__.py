"""Research scripts: the measurements behind the research record (research/*.md), each run as `python -m research.<name>`.

  ablation  which Degeneration-Tuning settings matter, one recipe key changed at a time
  diagnose  where shields change the UNet: ‖ΔW·x‖ / ‖W·x‖ per layer type, off and on target
  stacking  how shields hold up when 1 … n are stacked, merged and baked, on phrasings nobody tuned on
  dilution  how far an attack's found prompts dilute a text-local shield's response
  pooled    SDXL: does a concept travel through the pooled path (mixed conditionings)

They use the product (`dt_lora.toy`, `dt_lora.shield.train`, …); nothing in the product imports them.
"""
