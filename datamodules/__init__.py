"""Data: the synthetic world, shard writers, streaming DataModules, transforms, tokenisation."""
