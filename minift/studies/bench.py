"""CUDA-aware memory/throughput harness: every method against full fine-tuning.

Same shape as nanoGPT's bench.py: build the model (random init: weights do not change speed),
apply the method, run warm-up steps, then time each step of a window with CUDA events
(``minift.studies.bench_timing``: the host queues the steps without waiting for the GPU, as a
training loop that reads nothing back each step does) and report the median. Peak memory is
``max_memory_allocated`` over the timed window after ``reset_peak_memory_stats`` (optimizer state
already exists by then: the steady-state peak of a whole step).

MFU: model FLOPs per token (``minift.studies.mfu``: 6N + 12·L·T·d for full fine-tuning, 4N + 12·L·T·d
over a frozen base) times tokens/s, over the bf16 matmul rate measured on the same card in the same run.
tokens/s counts seq_len positions per row for every method: for prefix and prompt tuning that
is P = 20 virtual positions plus seq_len - P text tokens (the PEFT baseline counts the same way).
The peer (transformers + peft) runs the same shapes in ``benchmarks/peft_baseline.py``: the
oracles are never imported from ``minift/``.

**Speed: what ``minift train`` runs.** With no speed setting each method runs the plan
``minift train`` picks for it (``bench_speed.py``; ``speed="eager"`` and the flags below override
it); each row records its plan (``Row.speed``) and its first step's time (``Row.first_step_s``,
compiling included) apart from the steady median.

Each optimization is a flag so its effect is measured, not assumed: ``frozen_bf16`` (every frozen
parameter in bf16, ``minift.fast.frozen``), ``compile`` (torch.compile), ``checkpointing``
(activation checkpointing), ``plain_ce`` (full fp32 logits, the naive loss, against
``minift.fast.loss``'s fused one), ``lora_merged_forward`` (LoRA through W0 + sBA,
``minift.fast.lora.MergedLoRA``; with ``lora_factor_kernel`` its backward's g B and g^T (A x) in one
pass, ``kernels.lora_factor_grads``; ``lora_recompute_act``: the MLP's activation recomputed in
down_proj's backward, ``minift.fast.mlp``, the plan's choice for compiled rows), ``loss_chunk``
(positions per vocabulary projection in GPT's loss; default 1024 for a frozen head), ``fused_adamw``
(one fused AdamW kernel on CUDA; off: the multi-tensor ``foreach`` AdamW), ``sdpa_math`` (SDPA's
math backend, no flash kernels), ``sync_each_step`` (wait for the GPU after every timed step, as
older results did). ``dropout`` (default none) matches a recipe's run. ``isolate`` runs each method
in a fresh process (by default whenever a method may be compiled: torch 2.11 fails to compile a
second model in one process under CUDA graphs).

Models are the shapes of ``minift.studies.presets``: GPT-2 and Llama as causal LMs, BERT as a
two-class classifier. The low-rank methods adapt every projection of a block by default
(``default_lora_targets``): q, k, v, o, up and down, and on Llama gate_proj too, the third matrix
of its SwiGLU MLP, so that "all projections" means all of them on every model, as PEFT's
``target_modules="all-linear"`` does. A method a model refuses (BitFit on a Llama without biases:
nothing to train) is skipped with a note (``skip_reason``), not run.

The rows are compared with full fine-tuning and written out (JSON, Markdown, PNG) by
``minift.studies.bench_report``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from minift.fast import adamw as fast_adamw
from minift.studies import bench_timing
# the report's names stay importable from here (minift.studies.bench.save, ...)
from minift.studies.bench_report import Row, add_ratios, save, to_markdown  # noqa: F401
from minift.studies.mfu import flops_per_token, matmul_params, measure_matmul_tflops  # noqa: F401
from minift.studies.memory import refusal
from minift.studies.presets import PRESETS
from minift.methods.common import count_trainable
from minift.methods.registry import METHODS, build_method
from minift.methods.spec import TrainHooks
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT
from minift.models.llama import Llama, LlamaConfig
from minift.training.forward import model_forward
from minift.training import speed
from minift.training.config import COMPILE_MODES
from minift.training.speed import SpeedPlan
from minift.studies.bench_speed import check_lora_backward, resolved, speed_meta, speed_plan, variant_name

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # GPT-2 and BERT: every projection
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # + SwiGLU's gate
VIRTUAL_TOKENS = 20
CAUSAL_LM = (GPT, Llama)  # the models bench trains as language models (BERT: a classifier)
SPEEDS = ("default", "eager")  # default: minift train's speed plan per method; eager: no compile, addmm LoRA


def default_lora_targets(model: str) -> tuple[str, ...]:
    """Every projection of a block of the preset ``model``: ``LLAMA_PROJ`` on Llama, else ``ALL_PROJ``."""
    return LLAMA_PROJ if isinstance(PRESETS[model], LlamaConfig) else ALL_PROJ


def skip_reason(model: str, method: str) -> str | None:
    """Why the preset ``model`` refuses ``method`` (None: it takes it; ``memory.refusal``: BitFit on a
    Llama without biases)."""
    return refusal(PRESETS[model], method)


@dataclass
class BenchConfig:
    model: str = "gpt2-medium"
    methods: tuple[str, ...] = tuple(METHODS)
    batch: int = 8
    seq_len: int = 1024
    steps: int = 10
    warmup: int = speed.WARMUP_STEPS
    device: str = "cuda"
    frozen_bf16: bool = True
    speed: str = "default"            # SPEEDS: minift train's plan per method (speed_plan), or "eager"
    fast: bool = True                 # minift.fast's pieces (False: the reference modules)
    compile: bool | None = None       # torch.compile; None: the plan decides
    compile_mode: str | None = None   # None: the plan decides; "reduce-overhead" adds CUDA graphs
    checkpointing: bool = False
    plain_ce: bool = False
    lora_merged_forward: bool | None = None  # None: the plan decides (on CUDA with minift.fast)
    lora_factor_kernel: bool = False  # merged LoRA layers: A's and B's gradients by kernels.lora_factor_grads
    lora_recompute_act: bool | None = None  # merged down_proj: the MLP's activation recomputed (fast.mlp); None: plan
    lora_stack_qkv: bool = False  # set from the plan (resolved): q, k, v's merged LoRA stacked (fast.qkv)
    loss_chunk: int | None = None  # GPT loss positions per vocabulary projection (None: lm_loss's default)
    fused_adamw: bool = True  # on CUDA; CPU runs use the default (foreach) AdamW
    sdpa_math: bool = False
    sync_each_step: bool = False  # CUDA timing: wait for the GPU after every step (bench_timing)
    isolate: bool | None = None  # each method in its own process; None: when a method may be compiled
    lora_targets: tuple[str, ...] = ()  # empty: default_lora_targets(model)
    dropout: float = 0.0  # the model's dropout (GPT, BERT) and LoRA/DoRA's: to match a recipe's run
    max_grad_norm: float | None = None  # clip gradients to this global norm each step, as a run does (None: not)
    activation_budget: float | None = None  # compiled rows: torch.compile's (speed.compile_context)
    seed: int = 0

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose from {', '.join(PRESETS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        if self.batch < 1 or self.seq_len <= VIRTUAL_TOKENS or self.steps < 1 or self.warmup < 0:
            raise ValueError(f"need batch >= 1, seq_len > {VIRTUAL_TOKENS}, steps >= 1, warmup >= 0")
        if self.speed not in SPEEDS:
            raise ValueError(f"unknown speed {self.speed!r}; choose from {', '.join(SPEEDS)}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile_mode!r}; choose from {', '.join(COMPILE_MODES)}")
        if self.device == "cpu":
            self.frozen_bf16 = False  # CPU runs are fp32 smoke tests
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and isinstance(PRESETS[self.model], LlamaConfig):
            raise ValueError(f"dropout is for the GPT-2 and BERT presets; {self.model} has none")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.activation_budget is not None and not 0 < self.activation_budget <= 1:
            raise ValueError(f"activation_budget must be in (0, 1], got {self.activation_budget}")
        check_lora_backward(self)
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 position, got {self.loss_chunk}")
        if self.isolate is None:  # torch 2.11: one model under CUDA graphs per process
            self.isolate = bool(self.compile) or (self.compile is None and self.speed == "default"
                                                   and self.device.startswith("cuda"))
        self.lora_targets = tuple(self.lora_targets) or default_lora_targets(self.model)


# ---------------------------------------------------------------------------- minift runs

def method_options(cfg: BenchConfig, method: str) -> dict:
    """The bench's own options; every other one is the registry's default, as in `minift train`
    (LoRA/DoRA r 8, alpha 16; AdaLoRA init_r 12 -> target_r 8, alpha 32; freeze bottom_up):
    the low-rank methods adapt ``cfg.lora_targets``, AdaLoRA prunes from the first step, and
    prefix / prompt tuning take P = 20 virtual positions."""
    targets = {"targets": cfg.lora_targets}
    lora = {**targets, **({"dropout": cfg.dropout} if cfg.dropout else {})}
    return {"lora": lora, "dora": lora, "adalora": {**targets, "tinit": 0, "tfinal": 0, "delta_t": 1},
            "prefix": {"num_virtual_tokens": VIRTUAL_TOKENS},
            "prompt": {"num_virtual_tokens": VIRTUAL_TOKENS}}.get(method, {})


def build(cfg: BenchConfig, method: str) -> tuple[torch.nn.Module, TrainHooks, SpeedPlan]:
    """Model with ``method`` applied (``minift.methods.registry``) and ``minift.fast``'s pieces as
    the speed plan says (``speed_plan``; compiling is the caller's, ``prepare``'s).

    Returns:
        (model, its training hooks, its speed plan).
    """
    mc = replace(PRESETS[cfg.model])
    with torch.device(cfg.device):  # initialize on the device: much faster for large models
        if isinstance(mc, LlamaConfig):
            model = Llama(mc)
        else:  # GPT-2 or BERT, with the dropout asked for (bench's default: none)
            mc.dropout = cfg.dropout
            model = BertClassifier(mc, num_labels=2) if isinstance(mc, BertConfig) else GPT(mc)
    hooks = build_method(model, method, method_options(cfg, method), total_steps=cfg.warmup + cfg.steps + 1).hooks
    p = speed_plan(cfg, method, hooks)
    from minift import fast  # every speed piece; LoRA's merged forward where the plan says
    from minift.fast import frozen
    if p.fast:
        fast.enable(model, merged_lora=p.merged_lora, loss_chunk=cfg.loss_chunk,
                    lora_factor_kernel=cfg.lora_factor_kernel, lora_recompute_act=p.recompute_act)
    elif p.merged_lora:
        fast.lora.enable(model, merged=True, factor_kernel=cfg.lora_factor_kernel)
        if p.recompute_act:
            fast.mlp.enable(model)
    speed.note_fast_layers(p, model)  # the row's variant and speed line, as minift train's (run.speed_up)
    if cfg.plain_ce:
        fast.loss.disable(model)
    model.checkpointing = cfg.checkpointing if isinstance(model, CAUSAL_LM) else False
    if isinstance(model, BertClassifier):
        model.bert.checkpointing = cfg.checkpointing
    model.to(cfg.device)
    if cfg.frozen_bf16:  # what minift train does on CUDA for every method but full fine-tuning
        frozen.enable(model)
    return model, hooks, p


def make_batch(model, cfg: BenchConfig, method: str) -> dict:
    """Random tokens; prefix/prompt methods get seq_len - P text tokens so P + T = seq_len."""
    T = cfg.seq_len - (VIRTUAL_TOKENS if method in ("prefix", "prompt") else 0)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, model.config.vocab_size, (cfg.batch, T), generator=g).to(cfg.device)
    if isinstance(model, CAUSAL_LM):
        return {"input_ids": ids, "attention_mask": None, "labels": ids}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (cfg.batch,), generator=g).to(cfg.device)}


def _autocast(device: str):
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=device != "cpu")


def _attention_backend(cfg: BenchConfig):
    """SDPA picks its fastest kernel (flash on CUDA) unless ``sdpa_math`` forces the plain one."""
    if not cfg.sdpa_math:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def _loss(model, batch, cfg: BenchConfig, hooks: TrainHooks):
    with hooks.forward_context(model) if hooks.forward_context else contextlib.nullcontext():
        return _forward_loss(model, batch, cfg, hooks)


def _forward_loss(model, batch, cfg: BenchConfig, hooks: TrainHooks):
    if cfg.plain_ce and isinstance(model, CAUSAL_LM):  # the naive loss: full fp32 logits
        b = {k: v for k, v in batch.items() if k != "labels"}
        out = model_forward(model, b | {"compute_logits": True})
        logits = out.logits[:, :-1].float()  # (B, T-1, vocab) fp32
        labels = batch["labels"][:, -logits.shape[1]:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss = model_forward(model, batch).loss
    if hooks.penalty is not None:  # AdaLoRA's orthogonal penalty, weighted
        loss = loss + hooks.penalty(model)
    return loss


@dataclass
class Prepared:
    """One method ready to time: its model, the step function ``time_steps`` calls, and what it ran with."""
    model: torch.nn.Module
    hooks: TrainHooks
    batch: dict
    step: Callable[[int], None]  # step(i): one training step (probing: one forward pass)
    plan: SpeedPlan
    cfg: BenchConfig      # ``resolved``: the plan's choices filled in
    train: bool


def prepare(cfg: BenchConfig, method: str) -> Prepared:
    """Build ``method``'s model (``build``), compile it as its plan says, and define its step."""
    torch.manual_seed(cfg.seed)
    model, hooks, p = build(cfg, method)
    rc = resolved(cfg, p)
    batch = make_batch(model, rc, method)
    train = method != "probe"
    graphs = rc.compile and rc.compile_mode == "reduce-overhead" and rc.device.startswith("cuda")
    if rc.compile:
        model.compile(mode=rc.compile_mode)
        if graphs:
            speed.GRAPHED[0] = True  # a second model in this process compiles without graphs (speed.plan)
    if train:
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=rc.device.startswith("cuda") and rc.fused_adamw)
        update = fast_adamw.chosen(opt, rc.fast)  # the clipping and AdamW step `minift train` takes here
        model.train()

        def step(i):
            if graphs:  # a new step: CUDA-graph outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with _autocast(rc.device):
                loss = _loss(model, batch, rc, hooks)
            loss.backward()
            update(rc.max_grad_norm)
            if hooks.allocator is not None:  # AdaLoRA: after the update, before zero_grad (as PEFT)
                hooks.allocator.step(model, i)
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        @torch.no_grad()
        def step(i):  # probing: one forward pass that keeps every layer's features
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with _autocast(rc.device):
                extra = {"output_hidden_states": True}
                if isinstance(model, CAUSAL_LM):
                    extra["compute_logits"] = False  # features only, no vocabulary projection
                model_forward(model, {k: v for k, v in batch.items() if k != "labels"} | extra)
    return Prepared(model, hooks, batch, step, p, rc, train)


def timed_first(step, device: str, first: list[float]):
    """``step`` whose first call is timed on the host clock, the GPU synchronized before and after
    (compiling and capturing CUDA graphs happen there), its seconds appended to ``first``."""
    cuda = device.startswith("cuda")

    def wrapped(i):
        if first:
            return step(i)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        first.append(time.perf_counter() - t0)
    return wrapped


def run_minift(cfg: BenchConfig, method: str, peak_tflops: float | None) -> Row:
    pr = prepare(cfg, method)
    model, rc, train = pr.model, pr.cfg, pr.train
    first: list[float] = []
    compiling = speed.compile_context(rc.activation_budget if rc.compile else None, rc.compile)
    with _attention_backend(rc), compiling:  # the step compiles in its first call, inside
        ms, peak, times = bench_timing.time_steps(timed_first(pr.step, rc.device, first), rc)
    trainable, total = count_trainable(model)
    mc = model.config
    n, nt = matmul_params(model, lm_head=train)
    inner = model.bert if isinstance(model, BertClassifier) else model
    bl = mc.n_layer - inner.grad_from_layer
    d = mc.n_head * mc.head_dim if isinstance(mc, LlamaConfig) else mc.n_embd  # the query heads' width
    fpt = flops_per_token(n, nt, mc.n_layer, rc.seq_len, d, backward_layers=bl, train=train)
    tps = rc.batch * rc.seq_len / (ms / 1e3)
    mfu = fpt * tps / (peak_tflops * 1e12) if peak_tflops else float("nan")
    variant = variant_name(rc, method)
    row = Row("minift", rc.model, method, variant, _device_name(rc.device), "bf16-autocast"
              if rc.device != "cpu" else "fp32", rc.batch, rc.seq_len, trainable, total, ms, tps, peak, mfu,
              extra={"step_ms_each": [round(t, 2) for t in times]},
              first_step_s=round(first[0], 3) if first else float("nan"), speed=pr.plan.describe())
    del model, pr
    if rc.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _run_isolated(cfg: BenchConfig, method: str, peak_tflops: float | None) -> Row:
    """``run_minift`` in a fresh (spawned) process; its exceptions are raised here, and a worker
    that dies (killed, out of host memory) raises ``BrokenProcessPool`` instead of hanging."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(run_minift, cfg, method, peak_tflops).result()


# ---------------------------------------------------------------------------- the run

def _device_name(device: str) -> str:
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    return torch.cuda.get_device_name() if device.startswith("cuda") else cpu


def run(cfg: BenchConfig, *, progress=print, on_row=None) -> list[Row]:
    """Every method of ``cfg`` on one model (PEFT side by side: benchmarks/peft_baseline.py).
    ``on_row(rows)`` gets the rows so far after each method, so a killed run keeps what finished."""
    peak = measure_matmul_tflops(cfg.device) if cfg.device.startswith("cuda") else None
    rows = []
    for m in cfg.methods:
        why = skip_reason(cfg.model, m)
        if why is not None:
            progress(f"minift {cfg.model} {m}: skipped ({why})")
            continue
        progress(f"minift {cfg.model} {m}")
        row = (_run_isolated if cfg.isolate else run_minift)(cfg, m, peak)
        row.extra.setdefault("matmul_tflops", peak)
        rows.append(row)
        if on_row is not None:
            on_row(add_ratios(rows))
    return add_ratios(rows)


def meta(cfg: BenchConfig) -> dict:
    """The run's settings, written above its table; the methods skipped, with why, when any was."""
    m = {"device": _device_name(cfg.device), "torch": torch.__version__,
         "dtype": "bf16 autocast" if cfg.device != "cpu" else "fp32", "batch": cfg.batch,
         "seq_len": cfg.seq_len, "steps": cfg.steps, "warmup": cfg.warmup,
         "lora_targets": ",".join(cfg.lora_targets), "timing": bench_timing.describe(cfg),
         "date": time.strftime("%Y-%m-%d")}
    if cfg.methods:  # minift rows (benchmarks/peft_baseline.py's config has none: no minift speed line)
        m["speed"] = speed_meta(cfg)
    if cfg.max_grad_norm is not None:
        m["max_grad_norm"] = cfg.max_grad_norm
    skipped = [f"{k} ({why})" for k in cfg.methods if (why := skip_reason(cfg.model, k)) is not None]
    if skipped:
        m["skipped"] = "; ".join(skipped)
    return m
