"""Datasets: reading files, tokenizing records, batching."""
