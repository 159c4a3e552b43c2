"""Several processes: `torchrun` data parallel, with PyTorch's own DDP and FSDP2 doing the work.

- `start()` joins the process group torchrun describes in the environment (NCCL between GPUs, gloo
  on CPUs and for host objects) and gives a `Dist`: rank, world size, this rank's device. Without
  torchrun it is one process, and every method below is a no-op.
- `Dist.wrap(model)` puts the model inside a `Runner`, a module whose forward runs any function on
  the model, and wraps that in DDP (LoRA, QLoRA) or FSDP2 (`fully_shard` per decoder layer, then
  the root; full fine-tuning). Every use of the weights - the loss, sampling, evaluation - goes
  through `runner(fn, *args)`, so DDP prepares its gradient all-reduce and FSDP2 gathers the shards
  whatever the task computes.
- The global batch is the unit: each rank takes `grad_accum` micro-batches of a step's
  `grad_accum × world` and the normalizer (tokens, pairs, completions) is summed over ranks before
  the backward. DDP and FSDP2 average gradients over ranks, so each rank's loss is scaled by the
  world size: the summed gradient is that of one process running all the micro-batches.
- Checkpoints: under DDP every rank holds the same weights and optimizer; rank 0 saves them. Under
  FSDP2 the full (unsharded) model and optimizer state are gathered to rank 0, so a checkpoint
  loads on any world size.
"""

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


class Runner(nn.Module):
    """The model, with a forward that runs `fn(model, *args)`: DDP and FSDP2 see every use of the
    weights as a forward of theirs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun (a world of 1 included: it then runs DDP/FSDP2 of one)
    mode: str = "none"  # "none" (one plain process), "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- wrapping ---------------------------------------------------------------------------

    def wrap(self, model) -> nn.Module:
        """The model inside a Runner, in DDP or FSDP2 as `self.mode` (from `mode_for`) says."""
        runner = Runner(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # device_ids=None: DDP leaves the inputs where they are (labels stay on the host);
            # no buffer sync in forward: ranks may run different numbers of no-grad forwards (sampling)
            params = inspect.signature(DistributedDataParallel).parameters
            quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            return DistributedDataParallel(runner, device_ids=None, **quiet)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(model):
                fully_shard(layer)
            fully_shard(runner)
        return runner

    def no_sync(self, runner, last: bool):
        """The gradients are reduced over ranks on the last micro-batch of a step only."""
        if self.mode == "fsdp":
            runner.set_requires_gradient_sync(last)
        if self.mode == "ddp" and not last:
            return runner.no_sync()
        return contextlib.nullcontext()

    # ---- collectives --------------------------------------------------------------------------

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    # ---- state --------------------------------------------------------------------------------

    def full_state(self, model, optimizer):
        """(model state dict, optimizer state dict), whole, on rank 0; None for the model where the
        model saves itself (one process, DDP). A collective under FSDP2: every rank calls it."""
        if self.mode != "fsdp":
            return None, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)

    def load_full_state(self, model, optimizer, model_sd, optim_sd):
        """The inverse of full_state under FSDP2: every rank read the same files; each keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        if model_sd is not None:
            set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd, options=opts)

    def close(self):
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


def start() -> Dist:
    """This process's place in the job: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or one process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"process {local} of this machine has no GPU of its own: {torch.cuda.device_count()} visible, "
                          f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes; start at most one process per GPU "
                          "(--nproc), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU processes")
    if cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if launched and not dist.is_initialized():
        # NCCL for GPU tensors, gloo for host objects; a stuck peer fails the job in minutes, not hours
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return Dist(rank=rank, world=world, local_rank=local, device=dev, launched=launched)


def mode_for(cfg, launched: bool) -> str:
    """`train.parallel` resolved: auto takes DDP for (Q)LoRA and FSDP2 for full fine-tuning; "none"
    for a plain process."""
    if not launched:
        return "none"
    p, m = cfg.train.parallel, cfg.model
    if p == "auto":
        p = "fsdp" if m.finetune == "full" else "ddp"
    if p == "fsdp" and m.finetune == "lora":
        raise ConfigError("train.parallel = \"fsdp\" with LoRA" + (" on a 4-bit base (QLoRA)" if m.load_in_4bit else "")
                          + " is not supported yet: fasttune shards full fine-tuning only (it does not shard "
                          "bitsandbytes' 4-bit weights, nor save adapters from shards). Set train.parallel = \"ddp\" "
                          "(each GPU holds the base, which QLoRA keeps small) or model.finetune = \"full\"")
    return p


def decoder_layers(model) -> list[nn.Module]:
    """The model's repeated blocks, each its own FSDP2 unit: the classes transformers names in
    `_no_split_modules`, else its gradient-checkpointing layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers
