"""Data: the synthetic world, shard streaming, corpus plug-ins, transforms, tokenisation and
DataModules (installed as ``lit_vlm.datamodules``)."""

from lit_vlm.datamodules.batch import batch_size
from lit_vlm.datamodules.conversations import ConversationDataModule
from lit_vlm.datamodules.corpus import Corpus, Split
from lit_vlm.datamodules.image_text import ImageTextCorpus, ImageTextDataModule
from lit_vlm.datamodules.interleaved import InterleavedCorpus, InterleavedDataModule
from lit_vlm.datamodules.shards import ShardDataModule
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.video_audio import VideoAudioCorpus, VideoAudioDataModule
from lit_vlm.datamodules.world_text import WorldTextDataModule

__all__ = ["ConversationDataModule", "Corpus", "ImageTextCorpus", "ImageTextDataModule", "InterleavedCorpus", "InterleavedDataModule", "ShardDataModule", "Split", "Tokenizer", "VideoAudioCorpus", "VideoAudioDataModule", "WorldTextDataModule", "batch_size"]
