"""Build-time training of the canvas world: tokenizer, VAE, denoiser, evaluator and card."""
