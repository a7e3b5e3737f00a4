"""What `direct-align compare` runs: each method of the built-in task at a few strengths.

Every run is a plain CLI command of this package, so any row of the comparison can be rerun by
hand. All runs start from the same base model (the SFT stage of the built-in task) and learn from
the same 2,000 preference pairs. PPO and online DPO learn from them through a reward model,
trained once and shared by those runs (its time is charged to each of their pipelines); online
DPO uses it as its judge, so it sees no more information than PPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline: ``direct-align COMMAND ARGS`` (output dir added at run time)."""

    name: str  # "reward_model", "ppo", "train" or "online"
    command: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Method:
    """One point of the comparison: a method at one strength, as the stages that produce it."""

    name: str  # a unique run name, e.g. "dpo-b0.1"
    method: str  # "dpo", "ipo", "orpo", "simpo", "ppo", "online-dpo"
    strength: str  # the parameter varied, e.g. "β" or "KL coef"
    value: float
    stages: tuple[Stage, ...] = field(default_factory=tuple)


# (method, strength name, flag, values) at full size; quick mode takes the middle value only
OFFLINE = [("dpo", "β", "--beta", (0.03, 0.1, 0.3, 1.0)),
           ("ipo", "β", "--beta", (0.1, 0.5, 2.0)),
           ("orpo", "λ", "--beta", (0.1, 0.5, 1.0)),
           ("simpo", "β", "--beta", (1.0, 2.0, 5.0))]  # fmt: skip
PPO_KL = (0.02, 0.05, 0.2)
ONLINE_BETA = (0.1, 0.3)  # online DPO, judged by the same reward model as PPO


@dataclass(frozen=True)
class Budget:
    """How long each method trains; quick mode is for tests and a first look."""

    offline_steps: int | None  # None: the built-in preset (2 epochs over the pairs)
    rm_steps: int | None  # None: the reward model's built-in preset (3 epochs)
    ppo_rollouts: int  # of 64 responses each
    online_rounds: int  # of 64 prompts × 4 responses each, 4 epochs over the round's pairs
    eval_prompts: int


FULL = Budget(offline_steps=None, rm_steps=None, ppo_rollouts=40, online_rounds=10, eval_prompts=128)
QUICK = Budget(offline_steps=30, rm_steps=60, ppo_rollouts=10, online_rounds=4, eval_prompts=64)


def plan(quick: bool, seed: int) -> tuple[Stage, list[Method]]:
    """(the shared reward-model stage, every method's run) for a full or quick comparison."""
    budget = QUICK if quick else FULL
    common = ("--seed", str(seed), "--eval-prompts", str(budget.eval_prompts))
    rm_args = ("--seed", str(seed))
    if budget.rm_steps is not None:
        rm_args += ("--max-steps", str(budget.rm_steps))
    reward_model = Stage("reward_model", "train-rm", rm_args)
    methods: list[Method] = []
    for loss, strength, flag, values in OFFLINE:
        for value in values[len(values) // 2 : len(values) // 2 + 1] if quick else values:
            args = ("--loss", loss, flag, str(value), "--eval-every", "0", *common)
            if budget.offline_steps is not None:
                args += ("--max-steps", str(budget.offline_steps))
            methods.append(Method(f"{loss}-{value:g}", loss, strength, value,
                                  (Stage("train", "train", args),)))  # fmt: skip
    for kl in PPO_KL[1:2] if quick else PPO_KL:
        args = ("--kl-coef", str(kl), "--rollouts", str(budget.ppo_rollouts), "--eval-every", "0",
                *common)  # fmt: skip
        methods.append(Method(f"ppo-{kl:g}", "ppo", "KL coef", kl,
                              (reward_model, Stage("ppo", "ppo", args))))  # fmt: skip
    for beta in ONLINE_BETA[:1] if quick else ONLINE_BETA:
        args = ("--loss", "dpo", "--beta", str(beta), "--online", "--rounds",
                str(budget.online_rounds), "--prompts-per-round", "64", "--samples-per-prompt", "4",
                "--epochs", "4", "--eval-every", "0", *common)  # fmt: skip
        methods.append(Method(f"online-dpo-{beta:g}", "online-dpo", "β", beta,
                              (reward_model, Stage("online", "train", args))))  # fmt: skip
    return reward_model, methods
