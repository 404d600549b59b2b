"""Model folders on disk: a base model (config + UNet [+ VAE] [+ text encoder + tokenizer]), a VAE, the
text parts. Each part saves and loads its own files, as diffusers' components do; ``checkpoint`` moves the
bytes."""
