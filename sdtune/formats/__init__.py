"""LoRA state-dict conversions (peft ⇄ diffusers ⇄ kohya) and their metadata."""
