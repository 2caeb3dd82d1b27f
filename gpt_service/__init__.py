"""GPT Service: LoRA fine-tuning and multi-adapter serving for Hugging Face causal LMs."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) warns at import, on CPUs with AVX-512 BF16,
# that it could not fetch an optional 4-bit kernel from the Hugging Face hub; we never run code from
# the hub, and its built-in kernel is used instead. Quieted here, before any import of peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
