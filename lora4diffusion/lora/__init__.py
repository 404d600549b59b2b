"""Adapters: the adapted layers and the adapter-method contract (`layers`, `method`), LoRA (`lora`), adapter
files (`adapters`), SVD extraction and resizing (`extract`), prompt-model adapters (`prompt_lora`), training
(`finetune`)."""
