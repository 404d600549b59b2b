"""File formats of other tools (diffusers, PEFT, kohya): pure name and shape conversions of state dicts."""
