"""Training: the one loop (loop.py) and what it trains: a label base (base.py), a prompt base
(prompt_base.py), the VAE (vae.py), LoRA adapters (lora.py). Each task supplies a loss; the loop does the
rest."""
