"""lora4diffusion: a from-scratch Stable-Diffusion-style UNet, DDPM/DDIM and hand-written LoRA on MNIST."""

__version__ = "0.1.0"
