"""The networks of the miniature Stable Diffusion. They know nothing of files, LoRA or the command line."""
