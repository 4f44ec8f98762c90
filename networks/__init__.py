"""LoRA networks (kohya-ss/sd-scripts ``networks/``)."""
