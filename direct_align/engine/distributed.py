"""What multi-process training (``accelerate launch`` or ``torchrun``) changes, in one place.

Every process holds a replica of the policy (DDP; FSDP and DeepSpeed shard it, through
accelerate's configuration). An optimizer step's micro-batches are dealt out round-robin, so
the step is the same ``--grad-accum`` micro-batches of ``--batch-size`` pairs whatever the
process count: the effective batch does not change with it. The main process alone writes files
and talks to trackers; the others wait for it where the files matter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list

from direct_align.errors import ConfigError

T = TypeVar("T")


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The Accelerator of a run; several processes without CUDA (e.g. ``torchrun`` on CPUs)
    join one gloo group, which accelerate does only when told the run is on CPUs.

    accelerate turns FSDP on (``ACCELERATE_USE_FSDP``, set by ``accelerate launch`` with an FSDP
    config) only on accelerator devices and silently runs plain data parallel on CPUs; there the
    run is switched to FSDP by hand (:func:`_fsdp_on_cpus`), so that a CPU run shards too."""
    cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        # a second run in one process (a script, a test) with its own precision: accelerate
        # keeps its state per process and refuses a new mixed precision; one process has no
        # group to keep, so the state starts afresh
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpus)
    if cpus and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpus(accelerator)
    if cpus and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _deepspeed_on_cpus(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        _fsdp_bf16_policy(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ConfigError("DeepSpeed ZeRO-3 is not supported yet (the chunked LM head, the "
                              "reference pass, sampling and frozen models read weights it "
                              "partitions outside their modules' forward); use "
                              "configs/accelerate/fsdp.yaml, which shards weights, gradients "
                              "and optimizer state too, or zero2.yaml")  # fmt: skip
    return accelerator


def _deepspeed_on_cpus(accelerator: Accelerator) -> None:
    """What accelerate's state does for DeepSpeed on GPUs, on CPUs (accelerate ignores
    ``ACCELERATE_USE_DEEPSPEED`` there): DeepSpeed's communication on the gloo group, the plugin
    read from the ``ACCELERATE_DEEPSPEED_*`` variables, and the DeepSpeed type that makes
    ``prepare`` build DeepSpeed's engine. DeepSpeed runs on CPUs with its CPU accelerator."""
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    state = accelerator.state
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    accelerator.deepspeed_engine_wrapped = None
    state.distributed_type = PartialState().distributed_type = DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, batch_size: int, max_grad_norm: float) -> None:
    """Before ``prepare``: DeepSpeed's batch settings, which it wants from a data loader that
    direct_align does not give it, and its gradient clipping (``--max-grad-norm``, 0: none).
    direct_align deals out the micro-batches itself and marks the last of each step
    (:func:`backward`), so DeepSpeed's own accumulation stays 1."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
                  train_batch_size=batch_size * accelerator.num_processes,
                  gradient_clipping=max_grad_norm)  # fmt: skip


def backward(accelerator: Accelerator, loss: torch.Tensor, last: bool) -> None:
    """``accelerator.backward`` of one micro-batch; ``last``: the step's last in this process,
    where DeepSpeed reduces the accumulated gradients and steps (under DDP and FSDP
    ``no_sync`` marks the others)."""
    accelerator.gradient_state._set_sync_gradients(last)
    accelerator.backward(loss)
    accelerator.gradient_state._set_sync_gradients(True)


def _fsdp_on_cpus(accelerator: Accelerator) -> None:
    """What accelerate's state does for FSDP on GPUs (``AcceleratorState.__init__``), on CPUs:
    the plugin read from the ``FSDP_*`` variables, its mixed precision, and the FSDP type that
    makes ``prepare``, ``save_state``/``load_state`` and ``get_state_dict`` take the FSDP paths.
    torch's FSDP runs on CPUs with gloo."""
    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # every later AcceleratorState() copies PartialState's type over its own: set both
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def reads_weights(accelerator: Accelerator) -> bool:
    """Whether this process reads the policy's checkpoint. Under FSDP with accelerate's
    ``cpu_ram_efficient_loading`` (on in ``configs/accelerate/fsdp.yaml``) only the main process
    does: ``prepare`` broadcasts its tensors into every process's shards, so the others build
    the model without reading it (:func:`~direct_align.models.loading.unread_model`)."""
    plugin = accelerator.state.fsdp_plugin if shards(accelerator) else None
    return (accelerator.is_main_process or accelerator.num_processes == 1 or plugin is None
            or not plugin.cpu_ram_efficient_loading)  # fmt: skip


def from_main(compute: Callable[[], T], accelerator: Accelerator) -> T:
    """``compute()`` run in the main process alone, its (picklable) result given to every
    process; a collective."""
    if accelerator.num_processes == 1:
        return compute()
    box = [compute() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _fsdp_bf16_policy(accelerator: Accelerator) -> None:
    """FSDP2 in bf16 as close to one process under autocast as sharding allows. accelerate's
    policy gathers the weights in bf16 and computes with them (kept), reduces the gradients in
    bf16 (here fp32, and so accumulated in fp32 over the micro-batches), and casts every unit's
    outputs to bf16: the root's too, which are the policy's per-sequence log-prob sums (about
    -130 for 64 tokens, where bf16 keeps 3 significant digits: DPO's margins vanished and the
    step-2 loss was off by 1e-2). Outputs are left in the dtype they are computed in. Master
    weights and AdamW's state stay fp32."""
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    if plugin.fsdp_version == 2 and policy is not None and policy.param_dtype == torch.bfloat16:
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32,
                                                            output_dtype=None)  # fmt: skip


def is_main_rank() -> bool:
    """Whether this is the main process, before any Accelerator exists (launcher variables)."""
    return os.environ.get("RANK", "0") == "0"


def my_share(items: Sequence[T], accelerator: Accelerator) -> list[T]:
    """This process's items of a step: every ``num_processes``-th, from its index on."""
    return list(items[accelerator.process_index :: accelerator.num_processes])


def even_share(items: Sequence[T], accelerator: Accelerator) -> list[tuple[T, bool]]:
    """:func:`my_share` with a flag per item, padded to the same length in every process.

    DDP and FSDP communicate in every backward (FSDP in every forward too), so all processes
    must run as many passes: a process whose share is short repeats ``items[0]`` flagged False,
    to be run with weight 0. ``items`` must be non-empty.
    """
    n = accelerator.num_processes
    mine = [(item, True) for item in my_share(items, accelerator)]
    return mine + [(items[0], False)] * (-(-len(items) // n) - len(mine))


def sum_across(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each value summed over the processes (the identity in a single process)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    total = accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64,
                                            device=accelerator.device), "sum")  # fmt: skip
    return dict(zip(keys, total.tolist()))


def any_across(flag: bool, accelerator: Accelerator) -> bool:
    """Whether ``flag`` is true in any process (so that all take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(sum_across({"flag": float(flag)}, accelerator)["flag"] > 0)


def check_process_count(grad_accum: int, accelerator: Accelerator) -> None:
    """Each process must get the same number of micro-batches per step."""
    n = accelerator.num_processes
    if grad_accum % n:
        raise ConfigError(f"--grad-accum {grad_accum} must be a multiple of the {n} processes "
                          "(each takes grad_accum / processes micro-batches of every step)")  # fmt: skip


def quiet_unless_main(accelerator: Accelerator) -> None:
    """Only the main process logs progress; the others say only what goes wrong."""
    if not accelerator.is_main_process:
        logging.getLogger("direct_align").setLevel(logging.WARNING)


def shards(accelerator: Accelerator) -> bool:
    """Whether the run shards the policy with FSDP."""
    return accelerator.distributed_type == DistributedType.FSDP


@contextmanager
def root_unsharded(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """Under FSDP2 the root unit's own parameters (embeddings, final norm, LM head) are gathered
    by the prepared ``model``'s forward alone; a call into a submodule (``generate`` on the
    causal LM inside) needs them gathered around it. A no-op without FSDP."""
    if not shards(accelerator) or not hasattr(model, "unshard"):
        yield
        return
    # FSDP2 finds its root at the first forward; when that is a submodule's (sampling before
    # any pass through the whole model, e.g. online DPO without eval pairs), each unit called
    # would claim the root ("FSDP requires a single root module"): settle it here first
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def shard_frozen(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model (a reference, a reward model) ready to score: under FSDP sharded as the
    policy is (a unit per decoder layer, the rest in the root), its weights broadcast from the
    main process where only it read them (``cpu_ram_efficient_loading``), in the dtype it was
    loaded in; elsewhere moved to the device. Its forward must do all the scoring: FSDP gathers
    weights around forwards. It has no optimizer and is in no checkpoint. Under FSDP a
    collective: every process shards its frozen models in the same order and scores in step."""
    model.requires_grad_(False).eval()
    if not shards(accelerator):
        return model.to(accelerator.device)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError("frozen models (a reference, a reward model) are sharded with FSDP2 "
                          "only: set fsdp_version: 2, as configs/accelerate/fsdp.yaml does")  # fmt: skip
    names = plugin.transformer_cls_names_to_wrap
    if not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):  # the model's own layer classes
        plugin.transformer_cls_names_to_wrap = list(getattr(model, "_no_split_modules", None) or [])
    try:
        model = fsdp2_prepare_model(accelerator, model)
    finally:
        plugin.transformer_cls_names_to_wrap = names
    # the root too, as no backward follows to reshard it; not the units within, which keep
    # accelerate's settings (a head read after its group's forward stays gathered until then)
    model.set_reshard_after_forward(True, recurse=False)
    return model


def gathered_state_dict(model: torch.nn.Module, accelerator: Accelerator,
                        prefix: str = "model.") -> dict[str, torch.Tensor] | None:  # fmt: skip
    """Under FSDP, the whole (unsharded) state dict of the prepared ``model``'s submodule at
    ``prefix`` (the causal LM inside a :class:`PreferenceModel`), gathered to the main process,
    which alone gets the tensors (on CPU). A collective: every process must call it. None when
    the run does not shard, where the model's own weights are whole."""
    if not shards(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    # tied weights (embeddings and LM head) come back as copies; one tensor again, so that
    # save_pretrained writes them once, as it does for a model that was not sharded
    first: dict[int, str] = {}
    inner = accelerator.unwrap_model(model).get_submodule(prefix.rstrip("."))
    for name, param in inner.named_parameters(remove_duplicate=False):
        tied_to = first.setdefault(id(param), name)
        if tied_to != name and tied_to in state and name in state:
            state[name] = state[tied_to]
    return state


def engine_name(accelerator: Accelerator) -> str:
    """What runs the processes: "FSDP", "DeepSpeed", "DDP" or "one process"."""
    named = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}
    if accelerator.distributed_type in named:
        return named[accelerator.distributed_type]
    return "DDP" if accelerator.num_processes > 1 else "one process"


def check_resumable(checkpoint: Path, accelerator: Accelerator) -> None:
    """A checkpoint loads only under the engine that wrote it: FSDP (``pytorch_model_fsdp_*``),
    DeepSpeed (``pytorch_model/`` with ``latest``) or neither; an FSDP checkpoint also in one
    process. Say so before any work."""
    if any(checkpoint.glob("pytorch_model_fsdp_*")):
        written = "FSDP"
    elif (checkpoint / "latest").is_file():
        written = "DeepSpeed"
    else:
        written = "DDP or one process"
    running = engine_name(accelerator)
    running = "DDP or one process" if running in ("DDP", "one process") else running
    if written == "FSDP" and running != "DeepSpeed" and accelerator.num_processes == 1:
        return  # read whole (engine/unshard.py); under FSDP on any process count
    if written != running:
        where = " (any process count) or in one process" if written == "FSDP" else ""
        raise ConfigError(f"--resume: {checkpoint} was written under {written} and this run is "
                          f"under {running}; resume it under {written}{where}")  # fmt: skip

