"""Reward models: a scalar head on a causal-LM trunk, trained on preference pairs (Bradley-Terry).

``settings``: the settings of ``direct-align train-rm``; ``loss``: the Bradley-Terry objective;
``model``: loading an RM and scoring texts or token ids with it; ``evaluate``: held-out pair
metrics and rank correlations; ``loop``: the training loop; ``run``: settings to outputs;
``report``: the table the command prints. PPO and online DPO score samples with
:func:`direct_align.rm.model.score`.
"""
