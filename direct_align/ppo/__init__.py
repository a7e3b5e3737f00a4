"""The PPO baseline: RLHF's third stage, measured beside the direct losses.

``settings``: the settings of `direct-align ppo`; ``core``: GAE, the clipped losses and KL
control as pure functions; ``rollout``: sampling and scoring a batch of responses; ``models``:
the policy with a value function, and the frozen reference and reward model; ``loop``: the PPO
loop; ``run``: the command; ``report``: the table it prints.
"""
