"""Beyond one GPU: data-parallel and sharded training through ``torch.distributed``, launched by torchrun.

    torchrun --nproc-per-node 4 -m minift train ...            # data parallel, any method
    torchrun --nproc-per-node 4 -m minift train ... --shard    # full fine-tuning, FSDP2-sharded

torchrun starts N copies of the same ``minift train`` (the ranks) and tells each its place through
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``init`` joins them. A
plain ``python -m minift train`` is one process, and every function here is then the identity.

The global batch. ``--batch-size`` is the global micro-batch: the batch one process would take,
in the same order (``feed.batch_at``). Rank r takes its rows of it (``split``: B/N rows each) and
weighs its loss by its share of the batch's targets, t_r / t, so that

    loss(batch) = sum over ranks r of  t_r / t * loss(rows of r)     (t_r: targets in r's rows; t: in all)

and the gradients summed over the ranks are the gradient one process computes on the whole batch.
The loss in the log is that sum too (``sum_losses``): a run on N ranks logs the losses of the run
on one, up to floating-point rounding (with dropout off: each rank draws its own masks).

Data parallel (every method, the default with N > 1): every rank holds the whole model;
``replicate`` makes every replica rank 0's at the start and ``sum_gradients`` sums the gradients
after the last micro-batch of each step, so every rank takes the same optimizer step.

Sharded (``--shard``, full fine-tuning, for models whose weights, gradients and AdamW moments do
not fit one GPU): FSDP2's ``fully_shard`` on every block and on the root (``shard``). Each rank
keeps 1/N of every weight, gradient and moment, gathers a block's weights for its forward and
backward, and reduce-scatters (sums) its gradients. On CUDA the blocks compute in bf16
(``MixedPrecisionPolicy``); the sharded weights and moments stay fp32.

Ctrl-C. torchrun passes a Ctrl-C to every rank as SIGINT, each somewhere else in its step. While
``stop_together`` is on, SIGINT only sets a flag; ``stop_requested`` agrees on it at the end of each
step, so every rank stops after the same step and writes its part of one checkpoint. A second
SIGINT stops at once, without a checkpoint.

Checkpoints (``checkpoint.py``) go through ``torch.distributed.checkpoint``: each rank writes its
shards, a replicated tensor is written once, and the checkpoint loads on any number of ranks,
one process (no process group) included. Files meant for people (metrics, adapter, model, plot)
are written by rank 0 alone.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import os
import signal
import sys
import threading
import warnings

import torch
import torch.distributed as dist

from minift.files import InputError
from minift.training.checkpoint_read import trainable_keys

BUCKET = 1 << 25  # gradient elements summed in one all-reduce (128 MiB of fp32)


# ---------------------------------------------------------------------------- the process group

def launched_ranks() -> int:
    """How many processes torchrun started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check(method: str, batch_size: int, shard: bool, device: str = "cpu") -> None:
    """The launch's settings, before anything starts. Raises InputError (exit 2) for --shard with a
    method other than full fine-tuning or without several processes, for a global batch that
    does not divide evenly over the ranks, and for more ranks on a host than it has GPUs when the
    run is on CUDA (``device``: the run's --device)."""
    n = launched_ranks()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    if n > 1 and device.startswith("cuda:"):
        raise InputError(f"--device {device} would put every rank on one GPU; under torchrun give --device cuda "
                         f"(rank r takes GPU LOCAL_RANK) or auto")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if n > 1 and cuda and torch.cuda.device_count() < local:
        raise InputError(f"{local} ranks on this host but {torch.cuda.device_count()} GPU(s): launch at most "
                         f"one rank per GPU (--nproc-per-node), or train on the CPU with --device cpu")
    if shard and method != "full":
        raise InputError(f"--shard shards full fine-tuning; --method {method} trains a small part of the "
                         f"weights, and its replicas train data parallel without --shard")
    if shard and n == 1:
        raise InputError("--shard needs several processes: launch with torchrun --nproc-per-node N (N >= 2)")
    if batch_size % n:
        raise InputError(f"--batch-size {batch_size} is the global batch and must divide evenly over the {n} "
                         f"ranks; use a multiple of {n}")


def init() -> None:
    """Join the process group torchrun describes in the environment: NCCL for CUDA tensors (each
    rank on GPU LOCAL_RANK) when the host has a GPU for each of its ranks, gloo for CPU ones (and
    for every rank otherwise). Nothing for one process or a group already joined."""
    if launched_ranks() == 1 or dist.is_initialized():
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", launched_ranks()))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks:  # one GPU a rank
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=local)
    else:
        dist.init_process_group("gloo")
    atexit.register(close)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0, the one that writes the files meant for people (and the only one of one process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------- the model on the ranks

def replicate(model: torch.nn.Module) -> None:
    """Data parallel: every rank's trainable tensors become rank 0's, as DDP does when it starts.
    The ranks built the model alike (same files, same seed); this makes sure of it."""
    if world_size() == 1:
        return
    keys = set(trainable_keys(model))
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k in keys:
                dist.broadcast(t, src=0)


def shard(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` on each block of ``model.layers``, then on the model, over every rank on
    ``device``'s kind; on CUDA with ``bf16``, blocks compute in bf16 and gradients reduce in fp32.
    Gradients are summed over the ranks, not averaged (each rank's loss carries its share, ``split``).

    Returns the model's structure on the meta device (no memory), which ``gather`` fills with the
    trained weights to save them as a plain model.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    twin = _meta_copy(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = bf16 and device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # a block returns its attention's keys and values, views that training never changes in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # a plain sum, on NCCL and gloo alike
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return twin


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (shapes, no data)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def full_state_dict(model: torch.nn.Module) -> dict:
    """The model's state dict; a sharded model's gathered whole onto rank 0's CPU (every rank calls
    it; the others get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather(model: torch.nn.Module, twin: torch.nn.Module | None) -> torch.nn.Module | None:
    """What rank 0 saves at the end: ``model`` itself (data parallel, one process) or, for a sharded
    model, ``twin`` (from ``shard``) holding its gathered weights on the CPU. Other ranks: None.
    Every rank calls it."""
    if twin is None:
        return model if is_main() else None
    sd = full_state_dict(model)
    if not is_main():
        return None
    twin.load_state_dict(sd, assign=True)
    return twin


def laid_out_like(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``src``, a whole tensor, laid out as ``dst``: rank r's shard where ``dst`` is a sharded
    tensor (each rank calls it with the same ``src``), else ``src`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(dst, DTensor) or isinstance(src, DTensor):
        return src
    return distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements)


# ---------------------------------------------------------------------------- one step on the ranks

def split(batch: dict, model: torch.nn.Module) -> tuple[dict, float]:
    """This rank's rows of a global micro-batch, and its share t_r / t of the batch's loss.

    Rows are dealt as ``torch.tensor_split`` deals them (the last, smaller batch of an epoch may
    give a rank one row fewer). A rank left with no row runs the batch's first row with share 0:
    every rank runs every step (a sharded model's forward is a collective). One process: the batch
    itself and 1.0.
    """
    n = world_size()
    if n == 1:
        return batch, 1.0
    B = batch["input_ids"].shape[0]
    sizes = [len(t) for t in torch.arange(B).tensor_split(n)]
    lo = sum(sizes[:rank()])
    hi = lo + sizes[rank()]

    def take(a: int, b: int) -> dict:
        return {k: v[a:b] if torch.is_tensor(v) and v.dim() and v.shape[0] == B else v for k, v in batch.items()}
    if hi == lo:
        return take(0, 1), 0.0
    rows = take(lo, hi)
    return rows, targets(rows, model) / max(targets(batch, model), 1)


def targets(batch: dict, model: torch.nn.Module) -> int:
    """How many targets the model's loss on ``batch`` is the mean over: for a classifier one per
    example whose label is not -100 (every example for float labels: a regression); for a language
    model the labels after the shift that are not -100 and, with a soft prompt in front (its
    positions are -100), the first label of each row too."""
    labels = batch.get("labels")
    if labels is None or (labels.dim() == 1 and labels.is_floating_point()):
        return batch["input_ids"].shape[0]
    if labels.dim() == 1 or getattr(model, "soft_prompt", None) is not None:
        return int((labels != -100).sum())
    return int((labels[:, 1:] != -100).sum())


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Data parallel: each gradient summed over the ranks, in buckets of ``BUCKET`` elements, so
    every rank holds the gradient of the whole global batch. Sharded parameters were summed by
    FSDP2 in the backward; one process has nothing to sum. Every rank has gradients for the same
    parameters (every method's forward uses the same ones for any batch)."""
    from torch.distributed.tensor import DTensor
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    groups: dict[tuple, list] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for group in groups.values():
        bucket, size = [], 0
        for i, g in enumerate(group):
            bucket.append(g)
            size += g.numel()
            if size >= BUCKET or i == len(group) - 1:  # one all-reduce for the bucket, through a flat copy
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(part.view_as(t))
                bucket, size = [], 0


def sum_losses(losses: torch.Tensor) -> torch.Tensor:
    """Each rank's share of the step losses, summed over the ranks: the global batch's losses."""
    if world_size() == 1:
        return losses
    losses = losses.clone()
    dist.all_reduce(losses)
    return losses


# ---------------------------------------------------------------------------- Ctrl-C on every rank

class Stop(KeyboardInterrupt):
    """A Ctrl-C that every rank agreed to stop at, after the same step."""


_SIGINTS = [0]  # SIGINTs this rank received since stop_together began


@contextlib.contextmanager
def stop_together():
    """While on (several ranks, the main thread): SIGINT asks for a stop at the end of the step
    instead of raising KeyboardInterrupt wherever the rank stands; a second SIGINT raises at once."""
    if world_size() == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        _SIGINTS[0] += 1
        if _SIGINTS[0] > 1:
            raise KeyboardInterrupt
        if is_main():
            print("minift train: Ctrl-C: every rank stops after this step and saves a checkpoint "
                  "(Ctrl-C again: stop at once, without one)", file=sys.stderr)
    _SIGINTS[0] = 0
    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def stop_requested() -> bool:
    """Whether any rank received a SIGINT: one all-reduce of a flag on the CPU (gloo: no wait for
    the GPU), at the same point of the same step on every rank. Always False for one process."""
    if world_size() == 1:
        return False
    flag = torch.tensor([_SIGINTS[0]], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def agreed(interrupt: KeyboardInterrupt) -> bool:
    """Whether ``interrupt`` stops every rank at the same point (so a checkpoint can be written):
    always for one process; for several, only a ``Stop``."""
    return world_size() == 1 or isinstance(interrupt, Stop)
