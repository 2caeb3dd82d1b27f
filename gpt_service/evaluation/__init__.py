"""Evaluation of a model, or of a LoRA adapter against its base, on a dataset the trainer reads.

Token figures (loss, perplexity, next-token accuracy) over the tokens training counts, and, where
records carry a reference answer, greedy answers scored by exact match and chrF.

Nothing is imported here: the HTTP layer reads `evaluation.job` without pulling in torch.
"""
