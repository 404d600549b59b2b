"""The local web page (lora4diffusion serve)."""
