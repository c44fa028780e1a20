"""Fine-tuning the MoE embedder on (query, positive[, negatives]) pairs: the paper's recipe on sentence-transformers (finetune.py)."""
