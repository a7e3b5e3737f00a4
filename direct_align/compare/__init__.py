"""`direct-align compare`: PPO against the direct losses on the built-in task, measured."""
