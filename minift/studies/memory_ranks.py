"""The memory estimate of one rank of N, as ``minift train`` runs under torchrun
(``minift.training.distributed``).

``--batch-size`` is the global batch there: each rank takes ``batch / N`` rows. Two layouts:

**Data parallel** (any method): every rank holds the whole model, its gradients and optimizer
state, as one process does; its activations are those of ``batch / N`` rows. So the estimate is
``estimate_memory`` at ``batch / N``, plus what ``sum_gradients`` allocates between the backward
and the optimizer step: it sums the gradients in buckets of ``BUCKET`` elements through a flat copy
of each bucket (``torch.cat``), and the previous bucket's flat copy is still referenced while the
next one is made. The buckets are counted at the step's moment (``comm``), over the trainable
parameters in the model's order (embeddings first, then the blocks, then the top); the loop sums
them in its optimizer's order (matrices first, then biases and norms), so the two largest
consecutive buckets are an approximation, within one bucket (``BUCKET`` fp32 elements).

**Sharded** (``--shard``, full fine-tuning; FSDP2's ``fully_shard`` on every block and on the
root): each rank keeps 1/N of every fp32 weight, fp32 gradient and AdamW moment (each tensor's
share rounded up to whole elements; FSDP2 pads a tensor's first dimension to a multiple of N,
which can add a few rows more). On CUDA with bf16 the blocks compute in
bf16 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``): the weights a block
gathers are bf16, so autocast casts no weight (the symbolic forward runs with bf16 parameters,
and the LayerNorms' fp32 copies of their weights are counted as autocast makes them). The
unsharded working set (``gathered``), counted at the backward's moment on top of the activations
of ``batch / N`` rows (an upper bound of the backward's worst point):
  - the root's gathered weights (embeddings, final norm, head: FSDP2 keeps the root unsharded from
    its forward to the end of the backward) and their unsharded gradient (the tied head's
    gradient is made at the start of the backward and reduced at its end);
  - the largest block's gathered weights, its unsharded gradient in the compute dtype and, when
    that is bf16, the fp32 copy FSDP2 reduce-scatters (``reduce_dtype``).
Not counted: FSDP2's prefetch of the next block's weights while one block computes, and the
communication buffers NCCL allocates outside PyTorch's allocator.
At the optimizer step only the shards are left. Memory is in bytes.
"""
from __future__ import annotations

from dataclasses import replace

from minift.studies import memory
from minift.studies.memory import MemoryEstimate, MethodOptions, estimate_memory
from minift.studies.memory_tape import Forward, Net, Param, Projection, Tape
from minift.models.bert import BertConfig
from minift.training.distributed import BUCKET


def check_ranks(method: str, batch: int, nproc: int, shard: bool) -> None:
    """ValueError for a launch ``minift train`` refuses: fewer than one rank, --shard with a method
    other than full fine-tuning or with one rank, a global batch that does not divide over the ranks."""
    if nproc < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {nproc}")
    if shard and method != "full":
        raise ValueError(f"--shard shards full fine-tuning; {method} trains data parallel without --shard")
    if shard and nproc == 1:
        raise ValueError("--shard needs several ranks (N >= 2)")
    if batch % nproc:
        raise ValueError(f"the batch {batch} is the global batch and must divide evenly over the {nproc} ranks; "
                         f"use a multiple of {nproc}")


def estimate_per_rank(config, method: str, batch: int, seq_len: int, dtype: str = "bf16",
                      optimizer: str = "adamw", *, nproc: int = 1, shard: bool = False,
                      frozen_dtype: str | None = None, device: str = "cuda", **method_options) -> MemoryEstimate:
    """Peak memory of one rank of ``nproc`` training ``method`` on a global ``batch`` (see the module
    docstring); ``nproc=1`` is ``estimate_memory`` itself. Other arguments: ``estimate_memory``'s.

    Raises:
        ValueError: ``check_ranks``'s refusals, or ``estimate_memory``'s."""
    check_ranks(method, batch, nproc, shard)
    est = estimate_memory(config, method, batch // nproc, seq_len, dtype, optimizer, frozen_dtype=frozen_dtype,
                          device=device, **method_options)
    if nproc == 1:
        return est
    net = _net(config, method, est, frozen_dtype or dtype, method_options)
    if not shard:
        return replace(est, comm=bucket_bytes(net), ranks=nproc)
    return _sharded(config, est, net, nproc, batch // nproc, seq_len, dtype, optimizer, device, method_options)


def _net(config, method: str, est: MemoryEstimate, frozen_dtype: str, method_options: dict) -> Net:
    opts = MethodOptions(**method_options)
    P = opts.num_virtual_tokens if method in ("prefix", "prompt") else 0
    return memory._build(config, method, opts, memory._frozen_layers(method, opts, config.n_layer), P,
                         frozen_bytes=2 if frozen_dtype == "bf16" else 4)


def _in_model_order(net: Net) -> list[Param]:
    """Every parameter once, embeddings first, then the blocks, then the rest (the model's order)."""
    blocks = [p for blk in net.blocks for p in _block_params(blk)]
    first = [*net.emb, *blocks]
    seen = {id(p) for p in first}
    return list({id(p): p for p in first + [p for p in net.params if id(p) not in seen]}.values())


def _block_params(blk: dict) -> list[Param]:
    return [p for v in blk.values() for p in ((v.w, v.b, *v.adapter) if isinstance(v, Projection) else v) if p]


def bucket_bytes(net: Net) -> int:
    """The largest two consecutive flat buckets of ``sum_gradients`` (fp32 gradients, ``BUCKET``
    elements or more each: a bucket closes at the tensor that takes it to ``BUCKET``), in bytes."""
    sizes, size = [], 0
    grads = [p.n for p in _in_model_order(net) if p.grad]
    for i, n in enumerate(grads):
        size += n
        if size >= BUCKET or i == len(grads) - 1:
            sizes.append(size)
            size = 0
    return 4 * max((a + b for a, b in zip([0, *sizes], sizes)), default=0)


def _sharded(config, est: MemoryEstimate, net: Net, N: int, rows: int, seq_len: int, dtype: str,
             optimizer: str, device: str, method_options: dict) -> MemoryEstimate:
    params = _in_model_order(net)
    shard = sum(-(-p.n // N) for p in params)  # each tensor's share, rounded up
    state = (8 * shard + 4 * len(params)) if optimizer == "adamw" else 0  # exp_avg, exp_avg_sq, step
    cb = 2 if dtype == "bf16" and device == "cuda" else 4  # the compute dtype FSDP2 gathers in
    blocks = [sum(p.n for p in _block_params(blk)) for blk in net.blocks]
    root = sum(p.n for p in params) - sum(blocks)
    blk = max(blocks, default=0)
    gathered = 2 * cb * root + 2 * cb * blk + (4 * blk if cb != 4 else 0)
    activations, logits = est.activations, est.logits
    if cb == 2:  # the blocks compute with bf16 weights: the symbolic forward again, with bf16 parameters
        for p in params:
            p.b = 2
        opts = MethodOptions(**method_options)
        mask = opts.attention_mask if opts.attention_mask is not None else isinstance(config, BertConfig)
        activations, logits = Forward(Tape(autocast=True, cuda=True), net, config, "full", rows, seq_len, 0,
                                      mask=mask, orth_penalty=opts.orth_penalty).run()
    out = replace(est, weights=4 * shard, gradients=4 * shard, optimizer_state=state, activations=activations,
                  logits=logits, gathered=gathered, ranks=N)
    out.phase = "start of backward" if out.backward_peak >= out.step_peak else "optimizer step"
    return out
