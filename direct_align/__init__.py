"""direct_align: preference training with direct losses on Hugging Face models."""

__version__ = "0.1.0"
