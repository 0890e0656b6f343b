"""Training: the BPE tokenizer, token shards, the trainer, checkpoints, pretraining and SFT."""
