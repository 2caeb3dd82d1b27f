"""GPT Service: LoRA fine-tuning and multi-adapter serving for Hugging Face causal LMs."""

__version__ = "0.1.0"
