"""What goes out with ``final/``: its model card (``README.md``) and the upload to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from direct_align.errors import DirectAlignError, one_line


def model_card(*, title: str, command: str, summary: dict[str, Any], inputs: dict[str, Any],
               settings: dict[str, Any], wandb_url: str | None) -> str:  # fmt: skip
    """A Hugging Face model card: front matter for the Hub, then what the model was trained
    from, how, its held-out metrics before and after, and the command that made it."""
    model = inputs.get("model", {})
    data = inputs.get("data", {})
    method = settings.get("loss") or title
    lines = ["---", "library_name: transformers", "tags:", "- direct-align", f"- {method}"]
    if model.get("path"):
        lines.append(f"base_model: {model['path']}")
    lines += ["---", "", f"# {title}", ""]
    lines.append(f"Trained with [direct-align](https://pypi.org/project/direct-align/) "
                 f"`{command.split()[1] if len(command.split()) > 1 else 'train'}`"
                 f"{f' ({method})' if settings.get('loss') else ''}.")  # fmt: skip
    lines += ["", "## Training", ""]
    if model:
        lines.append(f"- base model: `{model.get('path')}` ({model.get('architecture')}, "
                     f"{model.get('parameters', 0):,} parameters, "
                     f"{model.get('trainable_parameters', 0):,} trained)")  # fmt: skip
    if data:
        rows = ", ".join(f"{k.removesuffix('_rows')} {v}" for k, v in data.items() if k.endswith("_rows"))
        lines.append(f"- data: `{data.get('source')}`" + (f" ({rows} rows)" if rows else ""))
    keys = ("loss", "beta", "learning_rate", "batch_size", "grad_accum", "epochs", "max_steps",
            "rounds", "rollouts", "kl_coef", "lora_r", "max_length", "precision", "seed")  # fmt: skip
    online = {"rounds": settings.get("online"), "rollouts": "kl_coef" in settings}
    shown = {k: settings[k] for k in keys if settings.get(k) is not None and online.get(k, True)}
    lines.append("- settings: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()))
    for k in ("steps", "rounds", "rollouts", "runtime_s"):
        if k in summary:
            lines.append(f"- {k.replace('_s', '').replace('_', ' ')}: {summary[k]}"
                         + (" s" if k == "runtime_s" else ""))  # fmt: skip
    initial, final = summary.get("initial", {}), summary.get("final", {})
    metrics = [k for k in final if isinstance(final[k], int | float)]
    if metrics:
        lines += ["", "## Held-out metrics", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(initial.get(k))} | {_fmt(final[k])} |" for k in metrics]
    builtin = summary.get("builtin")
    if isinstance(builtin, dict) and "policy/true_reward" in builtin:
        lines += ["", f"Built-in task: true reward of samples {builtin['reference/true_reward']:.3f} "
                      f"(reference) → {builtin['policy/true_reward']:.3f}, KL "
                      f"{builtin['policy/kl']:.2f} nats."]  # fmt: skip
    lines += ["", "## Reproduce", "", "```bash", command, "```"]
    if wandb_url:
        lines += ["", f"Weights & Biases run: {wandb_url}"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("–" if value is None else str(value))


def push_to_hub(repo: str, final: Path) -> str:
    """Upload ``final`` to the Hub repository ``repo`` (created if needed); returns its URL.
    Any failure (no network, no token, no rights) is one line that says final/ is kept."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(final), commit_message="direct-align")
    except Exception as e:  # the network and the Hub fail in many ways; all are the same to a user
        raise DirectAlignError(f"--push-to-hub {repo}: upload failed ({one_line(e, 200)}); the "
                               f"model is saved in {final}: upload it later with "
                               f"`hf upload {repo} {final}`") from None  # fmt: skip
    return f"https://huggingface.co/{repo}"
