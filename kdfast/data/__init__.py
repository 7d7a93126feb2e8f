"""Pretraining data: corpora (local text, HF ``datasets``, a built-in offline text), tokenization and
packing to fixed-length sequences, MLM masking, and the deterministic batch order shared by every arm."""
