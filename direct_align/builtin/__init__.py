"""The embedded default: a tiny base model and a preference task with a hidden true reward."""
