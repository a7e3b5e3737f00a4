"""Resume a checkpoint written under FSDP in a run that does not shard (one process).

FSDP checkpoints are torch distributed checkpoints (DCP): each process writes its shards and the
metadata says how they tile every tensor, so any number of processes can read them back. Under
FSDP, accelerate's ``load_state`` reads them onto the new process count. A run that does not
shard reads them whole here: the model's weights (``pytorch_model_fsdp_0/``) and AdamW's state
(``optimizer_0/``, keyed by parameter name), then the main process's RNG state as
``load_state`` would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

from direct_align.errors import ConfigError

MODEL_DIR, OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"


def written_sharded(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written under FSDP."""
    return (checkpoint / MODEL_DIR).is_dir()


def _read_whole(directory: Path) -> dict[str, Any]:
    """Every tensor of a distributed checkpoint directory, assembled whole, on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(directory), str(Path(tmp) / "whole.pt"))
        return torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=True)


def load_unsharded(checkpoint: Path, accelerator: Accelerator) -> None:
    """Load the FSDP ``checkpoint`` into this run's one model and optimizer, whole, and the RNG
    state of process 0; raises ConfigError when the weights do not fit the model."""
    if accelerator.num_processes != 1 or len(accelerator._models) != 1:
        raise ConfigError(f"--resume: {checkpoint} was written under FSDP; resume it under FSDP "
                          "(any process count) or in one process")  # fmt: skip
    model, optimizer = accelerator._models[0], accelerator._optimizers[0].optimizer
    weights = _read_whole(checkpoint / MODEL_DIR)["model"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--resume: {checkpoint / MODEL_DIR} does not fit this run's model "
                          f"({len(missing)} weights missing, {len(unexpected)} unexpected; "
                          "other --model or --lora-* settings?)")  # fmt: skip
    state = _read_whole(checkpoint / OPTIMIZER_DIR)["optimizer"]
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
    load_accelerator_state(str(checkpoint), [], [], [], [], process_index=0)  # the RNG alone
