"""lora4diffusion: a from-scratch Stable-Diffusion-style UNet, DDPM/DDIM and hand-written LoRA on MNIST."""

from lora4diffusion.threads import request_reproducible_blas

__version__ = "0.1.0"

# Before torch runs its first matrix product (MKL reads the mode once): see threads.request_reproducible_blas.
request_reproducible_blas()
