"""What `direct-align compare` runs: each method of the built-in task at a few strengths.

Every run is a plain CLI command of this package, so any row of the comparison can be rerun by
hand. All runs start from the same base model (the SFT stage of the built-in task) and learn from
the same 2,000 preference pairs. PPO and online DPO learn from them through a reward model,
trained once and shared by those runs (its time is charged to each of their pipelines); online
DPO uses it as its judge, so it sees no more information than PPO.

Every run is evaluated on the held-out prompts at its start and a few times along training (the
``--eval-every`` of its stage), so each contributes a curve of (KL, true reward) points.

The ``proxy`` task is the built-in task with a wrong reward model: it and the offline losses
learn from a small random subset of the pairs with a share of the labels flipped
(:data:`PROXY_PAIRS`, :data:`PROXY_NOISE`); PPO and online DPO optimise that reward model, and
every run is scored by the hidden (gold) reward and by the reward model (the proxy).
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
    method: str  # "dpo", "ipo", ..., "online-rebel", "ppo", "rloo" (see METHODS)
    strength: str  # the parameter varied, e.g. "β" or "KL coef"
    value: float
    stages: tuple[Stage, ...] = field(default_factory=tuple)


# (method, strength name, flag, values) at full size; quick mode takes the middle value only
OFFLINE = [("dpo", "β", "--beta", (0.03, 0.1, 0.3, 1.0)),
           ("ipo", "β", "--beta", (0.1, 0.5, 2.0)),
           ("orpo", "λ", "--beta", (0.1, 0.5, 1.0)),
           ("simpo", "β", "--beta", (1.0, 2.0, 5.0))]  # fmt: skip
# KTO on the built-in task's thumbs up or down (its samples labelled by the hidden reward, as
# `train --loss kto` reads them): unpaired feedback, so not like for like with the pairs; built-in
# task only (on the proxy task it would see the gold reward)
THUMBS = [("kto", "β", "--beta", (0.1, 1.0))]
# on the proxy task, also the losses built for flipped labels, told the true flip rate: robust
# DPO (Chowdhury et al. 2024) and conservative DPO (dpo --label-smoothing; Mitchell 2023)
NOISE_AWARE = [("robust", "robust", (0.1, 0.3)), ("cdpo", "dpo", (0.1, 0.3))]
# the proxy task's offline strengths: the losses the noise question is about (ORPO and SimPO,
# which have no reference, are left to the built-in task to keep the run short)
PROXY_OFFLINE = {"dpo": (0.1, 0.3), "ipo": (0.1, 0.5)}
PPO_KL = (0.02, 0.05, 0.2)
# online methods, judged by the same reward model as PPO: (method, loss, strength name, flag,
# values, extra flags). Online DPO plain and with an NLL term on the chosen response (RPO,
# --rpo-alpha), the best of the pair variants in docs/comparison.md; the losses that learn from
# every sample's reward (REBEL, SPPO, LiPO-λ, online KTO with the judge's thumbs); and RLOO, the
# critic-free RL baseline (β: its KL coefficient). REBEL, SPPO and RLOO take optimizer steps of
# 4 prompts' groups, 16 responses, as PPO's --mini-batch-size 16 does; their values were chosen
# on seed 42 (scripts/online_candidates.py, docs/comparison.md). Quick mode: the first value.
ONLINE = [("online-dpo", "dpo", "β", "--beta", (0.1, 0.3), ()),
          ("online-rpo", "dpo", "β", "--beta", (0.3, 1.0), ("--rpo-alpha", "1.0")),
          ("online-rebel", "rebel", "η", "--eta", (0.3, 1.0), ("--beta", "0.05", "--batch-size", "4")),
          ("online-sppo", "sppo", "η", "--eta", (3.0, 6.0), ("--batch-size", "4")),
          ("online-lipo", "lipo", "β", "--beta", (0.3,), ()),
          ("online-kto", "kto", "β", "--beta", (3.0,), ()),
          ("rloo", "rloo", "KL coef β", "--beta", (0.05, 0.2), ("--batch-size", "4"))]  # fmt: skip
# the proxy task runs one strength of the new online methods (the run is long enough)
PROXY_ONLINE = {"online-rebel": (1.0,), "online-sppo": (3.0,), "online-lipo": (0.3,),
                "online-kto": (3.0,), "rloo": (0.05,)}
# the methods that are reinforcement learning (the baselines), not direct losses
RL_METHODS = ("ppo", "rloo")
# quick mode leaves these out to stay short (online DPO with an NLL term is online
# DPO with one more term)
QUICK_SKIPS = ("online-rpo",)


@dataclass(frozen=True)
class Budget:
    """How long each method trains, and how often it is evaluated along the way; quick mode is
    for tests and a first look."""

    offline_steps: int | None  # None: the built-in preset (2 epochs over the pairs)
    rm_steps: int | None  # None: the reward model's built-in preset (3 epochs)
    ppo_rollouts: int  # of 64 responses each
    online_rounds: int  # of 64 prompts × 4 responses each, 4 epochs over the round's pairs
    eval_prompts: int
    eval_every: tuple[int, int, int]  # offline steps, PPO rollouts, online rounds


FULL = Budget(offline_steps=None, rm_steps=None, ppo_rollouts=40, online_rounds=10,
              eval_prompts=128, eval_every=(25, 8, 2))  # fmt: skip
QUICK = Budget(offline_steps=20, rm_steps=40, ppo_rollouts=10, online_rounds=2, eval_prompts=48,
               eval_every=(10, 5, 1))  # fmt: skip
ONLINE_PROMPTS, ONLINE_SAMPLES, ONLINE_EPOCHS = 64, 4, 4  # a round: 64 prompts × 4 samples, 4 epochs
ONLINE_BATCH = 32  # the built-in preset's --batch-size (pairs, thumbs or prompts' groups)


def online_steps_per_round(loss: str, batch_size: int) -> int:
    """Optimizer steps of one online round (its most; ties give fewer): pair losses make one pair
    a prompt, online KTO a thumb a sample, group losses one group a prompt."""
    items = ONLINE_PROMPTS * (ONLINE_SAMPLES if loss == "kto" else 1)
    return ONLINE_EPOCHS * -(-items // batch_size)
TASKS = ("builtin", "proxy")
PROXY_PAIRS = 200  # the proxy task's reward model and offline losses see this many pairs
PROXY_NOISE = 0.25  # of which this share have their labels flipped
PROXY_EPOCHS = 8  # over so few pairs, the reward model and offline losses train for longer


def plan(quick: bool, seed: int, task: str = "builtin",
         own: tuple[str, ...] = ()) -> tuple[Stage, list[Method]]:  # fmt: skip
    """(the shared reward-model stage, every method's run) for a full or quick comparison of
    one seed on ``task``; ``own``: on own data, the flags naming its model, training pairs and
    held-out prompts (``--model M --dataset TRAIN --eval-prompts-file EVAL``), given to every
    stage (the reward model takes the first two). KTO on thumbs is the built-in task's only."""
    budget = QUICK if quick else FULL
    every_offline, every_ppo, every_online = (str(n) for n in budget.eval_every)
    data: tuple[str, ...] = ()
    if task == "proxy":
        data = ("--train-pairs", str(PROXY_PAIRS), "--label-noise", str(PROXY_NOISE))
        every_offline = str(budget.eval_every[0] // 2)
        if budget.offline_steps is None:
            data += ("--epochs", str(PROXY_EPOCHS))
    common = ("--seed", str(seed), "--eval-prompts", str(budget.eval_prompts), *own)
    rm_args = ("--seed", str(seed), *data, *own[:4])
    if budget.rm_steps is not None:
        rm_args += ("--max-steps", str(budget.rm_steps))
    reward_model = Stage("reward_model", "train-rm", rm_args)
    methods: list[Method] = []
    offline = [(loss, loss, strength, flag, values, ()) for loss, strength, flag, values in OFFLINE]
    if task == "builtin" and not own:
        offline += [(loss, loss, strength, flag, values, ()) for loss, strength, flag, values in THUMBS]
    if task == "proxy":
        offline = [(name, loss, strength, flag, PROXY_OFFLINE[name], extra)
                   for name, loss, strength, flag, values, extra in offline if name in PROXY_OFFLINE]  # fmt: skip
        smoothing = ("--label-smoothing", str(PROXY_NOISE))
        offline += [(name, loss, "β", "--beta", values, smoothing)
                    for name, loss, values in NOISE_AWARE]  # fmt: skip
    for name, loss, strength, flag, values, extra in offline:
        for value in values[len(values) // 2 : len(values) // 2 + 1] if quick else values:
            args = ("--loss", loss, flag, str(value), *extra, "--eval-every", every_offline, *data,
                    *common)  # fmt: skip
            if budget.offline_steps is not None:
                args += ("--max-steps", str(budget.offline_steps))
            methods.append(Method(f"{name}-{value:g}", name, strength, value,
                                  (Stage("train", "train", args),)))  # fmt: skip
    for kl in PPO_KL[1:2] if quick else PPO_KL:
        args = ("--kl-coef", str(kl), "--rollouts", str(budget.ppo_rollouts), "--eval-every",
                every_ppo, *common)  # fmt: skip
        methods.append(Method(f"ppo-{kl:g}", "ppo", "KL coef", kl,
                              (reward_model, Stage("ppo", "ppo", args))))  # fmt: skip
    for name, loss, strength, flag, values, extra in ONLINE:
        if quick and name in QUICK_SKIPS:
            continue
        if quick:  # the preset's larger steps: a short first look
            extra = _without(extra, "--batch-size")
        # evaluated every few rounds whatever the steps of a round, as every online method is
        batch = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else ONLINE_BATCH
        every = int(every_online) * online_steps_per_round(loss, batch)
        if task == "proxy":
            values = PROXY_ONLINE.get(name, values)
        for value in values[:1] if quick else values:
            args = ("--loss", loss, flag, str(value), "--online", "--rounds",
                    str(budget.online_rounds), "--prompts-per-round", str(ONLINE_PROMPTS),
                    "--samples-per-prompt", str(ONLINE_SAMPLES), "--epochs", str(ONLINE_EPOCHS),
                    *extra, "--eval-every", str(every), *common)  # fmt: skip
            methods.append(Method(f"{name}-{value:g}", name, strength, value,
                                  (reward_model, Stage("online", "train", args))))  # fmt: skip
    return reward_model, methods


def _without(flags: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``flags`` without ``flag`` and its value."""
    if flag not in flags:
        return flags
    at = flags.index(flag)
    return flags[:at] + flags[at + 2 :]
