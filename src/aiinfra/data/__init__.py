"""Data: corpora, the byte-level BPE tokenizer, cached token files and the resumable sampler."""
