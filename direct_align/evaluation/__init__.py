"""Judging a policy by its samples: reward, win rate over the reference, KL and length."""
