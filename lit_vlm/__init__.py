"""lit-vlm: a PyTorch Lightning experiment suite for vision-language models."""
__version__ = "0.1.0"
