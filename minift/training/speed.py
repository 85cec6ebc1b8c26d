"""What ``minift train`` runs by default on CUDA: the fast path, chosen per run, each choice with an opt-out.

On the CPU a run takes the reference path as written (eager, no ``minift.fast`` piece, nothing
compiled) unless its settings ask for ``compile``. On CUDA, with nothing asked for:

    choice                        when                                        opt-out
    minift.fast's pieces          always (cast once, fused loss, LoRA's       --fast false
                                  faster forwards)
    the frozen base in bf16       every method but full fine-tuning (the      --fast false, --bf16 false
    (fast.frozen)                 base is never saved) under bf16 autocast,
                                  not with gradual unfreezing
    LoRA's merged forward         plain LoRA layers; a layer with dropout      --fast false
                                  takes the addmm forward while training
    q, k, v's LoRA stacked        two or three of an attention module's         --fast false
    (fast.qkv)                    q, k, v on the merged forward
    the MLP's activation          compiled runs, where down_proj takes the     --recompute-act false
    recomputed (fast.mlp)         merged forward: its input kept, not its
                                  output
    torch.compile, CUDA graphs    the method has no hook between the model's   --compile false, or
    (mode reduce-overhead)        steps (AdaLoRA's allocator and penalty,      --compile-mode default
                                  gradual unfreezing run eager)                (compiled, no graphs)
    batches padded to one shape   graphed runs of classification and           --compile false
    (the longest, the most rows)  prompt-completion: one shape, so the graphs
                                  are captured once, not once per length or
                                  for an epoch's short last batch (causal-lm
                                  blocks already have one shape)

Two more go with minift.fast (``--fast false`` turns them off too): a list of batches of at most
``feed.RESIDENT_BYTES`` is copied to the GPU once and read from there (``feed.py``; it changes no
number, and the memory it holds, the dataset's, counts in ``peak_gib``); and clipping with the AdamW
step run as fused AdamW's kernel, one call per parameter group, with the clipping folded in
(``fast.adamw``, where its ``applies`` holds).

Why: an eager LoRA step of GPT-2 medium is bound by the host issuing small kernels (it ran slower
than full fine-tuning, benchmarks/results/h200/flags-eager.md); CUDA graphs replay the whole step's
kernels at once, and the merged forward runs one GEMM per adapted layer instead of three.
Recomputing the MLP's activation trades one elementwise pass per layer for its widest saved
tensor; compiled, that costs little time for much memory, while an eager step, bound by the host,
slowed by more, so eager runs keep the activation (docs/speed.md has the measurements).
Each piece is tied to the reference path by an equivalence test (tests/fast/), and padding by
``tests/training/test_speed.py`` (padded positions are masked and carry no target).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from minift.methods.spec import TrainHooks


@dataclass
class SpeedPlan:
    fast: bool = False                # minift.fast.enable(model)
    merged_lora: bool = False         # ... with LoRA's merged forward
    bf16_frozen_base: bool = False    # minift.fast.frozen.enable(model) (takes_bf16_frozen_base)
    recompute_act: bool = False       # ... and fast.mlp: the MLP's activation recomputed in the backward
    stack_qkv: bool = False           # ... and fast.qkv: q, k, v's LoRA factors stacked (set by note_fast_layers)
    compile: bool = False
    compile_mode: str = "default"
    pad: bool = False                 # pad every training batch to one shape (data.pad_to_one_shape)
    notes: list[str] = field(default_factory=list)  # one line per choice, for the run's log

    def describe(self) -> str:
        return "; ".join(self.notes) if self.notes else "reference path (eager)"


GRAPHED = [False]  # a model was compiled under CUDA graphs in this process (set by the loop)

# Steps before a run's steady throughput is timed (minift train) and before minift bench's timed
# window: the first compiles the step; under CUDA graphs the next ones run it in the graphs' memory
# pool and record the graphs (torch.compile's CUDA graph trees), each far slower than a replay.
WARMUP_STEPS = 3

# the hooks that run between a model's forward passes or change the graph from step to step
EAGER_HOOKS = ("allocator", "penalty", "forward_context", "unfreezer")


def plan(*, device_type: str, method: str, hooks: TrainHooks, task: str, max_len: int, given: dict,
         merged_forward: bool = False, peft: bool = False) -> SpeedPlan:
    """The speed choices for one run.

    Args:
        device_type: "cuda" or "cpu".
        method: the method's name (for the notes).
        hooks: the method's training hooks (``MethodState.hooks``).
        task: classification | causal-lm | prompt-completion.
        max_len: the run's tokens per example.
        given: the run's [train] settings as given (flags, config, recipe): ``fast``, ``compile``,
            ``compile_mode`` and ``recompute_act`` there override the defaults.
        merged_forward: the method's settings ask for LoRA's merged forward (on any device).
        peft: the method saves no base weight (``MethodState.peft``: every method but full fine-tuning).
    """
    p = SpeedPlan()
    cuda = device_type == "cuda"
    p.fast = cuda and given.get("fast", True)
    p.merged_lora = merged_forward or p.fast
    if p.fast:
        p.notes.append("minift.fast on (cast once, fused loss, LoRA merged/addmm forward, lean AdamW step)")
    p.bf16_frozen_base = takes_bf16_frozen_base(fast=p.fast, peft=peft, bf16=given.get("bf16", True),
                                                hooks=hooks)
    hooked = [h for h in EAGER_HOOKS if getattr(hooks, h) is not None]
    if "compile" in given:
        p.compile = bool(given["compile"])
    elif cuda and hooked:
        p.notes.append(f"eager: {method}'s {' and '.join(hooked)} run between steps")
    else:
        p.compile = cuda
    if p.compile:
        p.compile_mode = given.get("compile_mode", "reduce-overhead" if cuda else "default")
        graphs = p.compile_mode == "reduce-overhead" and cuda
        if graphs and GRAPHED[0]:
            # torch 2.11 fails (or crashes) compiling a second model under CUDA graphs in one
            # process (minift bench runs each method in its own process for that reason)
            p.compile_mode, graphs = "default", False
            p.notes.append("no CUDA graphs: this process already captured another model's")
        p.pad = graphs and task != "causal-lm"
        p.notes.append(f"torch.compile mode {p.compile_mode}" + (" (CUDA graphs)" if graphs else "")
                       + (", batches padded to one shape" if p.pad else ""))
        p.recompute_act = p.fast and p.merged_lora and bool(given.get("recompute_act", True))
        if given.get("activation_budget") is not None:
            p.notes.append(f"activation memory budget {given['activation_budget']:g}")
    if given.get("recompute_act") and not p.recompute_act:  # asked for where it does not apply
        p.notes.append("MLP activation kept: recompute_act applies to compiled CUDA runs with minift.fast")
    return p


def note_fast_layers(p: SpeedPlan, model) -> None:
    """Once ``minift.fast`` is on ``model``: ``p.stack_qkv`` says whether any attention module stacks
    its q, k and v's LoRA factors while training (``fast.qkv.stacking``) and ``p.recompute_act``
    whether any MLP recomputes its activation (``fast.mlp.recomputing``: none without a LoRA down_proj,
    or with LoRA dropout); a note says how many of each."""
    from minift.fast import mlp, qkv
    stacking, recomputing = qkv.stacking(model), mlp.recomputing(model)
    p.stack_qkv, p.recompute_act = bool(stacking), bool(recomputing)
    if stacking:
        p.notes.append(f"q/k/v LoRA stacked: {len(stacking)} attention modules")
    if recomputing:
        p.notes.append(f"MLP activation recomputed: {len(recomputing)} MLPs")


def takes_bf16_frozen_base(*, fast: bool, peft: bool, bf16: bool, hooks: TrainHooks) -> bool:
    """Whether a run stores its frozen parameters in bf16 (``minift.fast.frozen``): with minift.fast
    on (CUDA), under bf16 autocast, for a method that saves no base weight, and without gradual
    unfreezing (a frozen weight it unfreezes would then train in bf16)."""
    return bool(fast and peft and bf16 and hooks.unfreezer is None)


def compile_context(budget: float | None, compiled: bool):
    """The context a compiled step runs in; torch.compile reads it when the step compiles (its first
    call, and any recompile).

    Two settings, while the context holds:

    - torch.compile keeps at most ``budget`` of the activations its partitioner (AOTAutograd) would
      save for the backward and recomputes the rest, cheapest first (pointwise ops such as GELU or
      LayerNorm's normalization before any matmul).
    - AOTAutograd's on-disk cache also takes graphs that hold custom autograd Functions
      (``autograd_cache_allow_custom_autograd_functions``, off by default in PyTorch), every one in
      the step. minift's step holds its own (``fast.loss.LinearCrossEntropy``,
      ``fast.lora.MergedLoRA``, ``fast.qkv.StackedMergedLoRA``, ``fast.mlp.ActMergedLoRA``), so without
      it each process traces the joint graph and partitions it again. With it, a later run of the same
      graph loads that from ``TORCHINDUCTOR_CACHE_DIR``, as it loads Inductor's kernels. A Function's
      forward and backward are traced into the graph, constants included, so the cache key sees them;
      the custom operators inside (``minift::lora_input_grad``, ``minift::act_recompute``, the Triton
      kernels) enter by name and run their Python bodies on every call.

    Args:
        budget: the share (0, 1] of the activations kept; None: PyTorch's default (1.0).
        compiled: whether the step is compiled; if not, nothing is set.
    Returns:
        A context manager (``torch._functorch.config.patch``, or a null context for an eager run).
    Raises:
        ValueError: a budget for a run that does not compile (it would change nothing).
    """
    if budget is not None and not compiled:
        raise ValueError(f"activation_budget {budget:g} applies to a compiled run, and this one runs eager "
                         f"(the speed plan or --compile false); leave it out or compile")
    if not compiled:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config
    options = {}
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # (not in every torch)
        options["autograd_cache_allow_custom_autograd_functions"] = True
    if budget is not None:
        options["activation_memory_budget"] = budget
    return functorch_config.patch(**options)
