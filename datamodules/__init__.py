"""Data: the synthetic world, shard streaming, transforms, tokenisation and DataModules
(installed as ``lit_vlm.datamodules``)."""

from lit_vlm.datamodules.image_text import ImageTextDataModule
from lit_vlm.datamodules.tokenizer import Tokenizer

__all__ = ["ImageTextDataModule", "Tokenizer"]
