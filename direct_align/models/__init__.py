"""Models: loading Hugging Face causal LMs and the policy, attention backends (segments, varlen,
flash), LoRA, and response log-probs without materialised logits."""
