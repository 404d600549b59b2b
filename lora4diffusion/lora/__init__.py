"""LoRA: the adapter layers (`layers`), our adapter files (`adapters`) and training one (`finetune`)."""
