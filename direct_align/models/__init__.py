"""Loading Hugging Face causal LMs and computing response log-probs."""
