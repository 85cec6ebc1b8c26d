"""Memory estimator: the peak bytes of one fine-tuning step of a method, without running it.

The training step the estimate models (the one ``minift.studies.bench`` runs and
``benchmarks/advisor_check.py`` measures on a GPU):
  - parameters: trainable ones fp32 (master weights); frozen ones in ``frozen_dtype``
    (``minift train`` on CUDA and the bench store them in bf16, ``minift.fast.frozen``; a
    frozen bf16 embedding makes the residual stream bf16, the estimate follows those dtypes op
    by op);
  - forward under ``torch.autocast("cuda", dtype=torch.bfloat16)``: matmuls and SDPA in bf16
    (the models cast the attention input and the MLP input once (``cast_once``), one bf16
    copy shared by q, k, v, up_proj (Llama: gate_proj too) and their LoRA A / AdaLoRA factors;
    any other fp32 input is cast anew for every matmul; fp32 trainable weights once per forward
    through autocast's cache), LayerNorm and RMSNorm in fp32; SDPA flash attention (no T x T
    matrix kept; memory-efficient attention with an additive bias when a mask is present; a
    GPT or Llama prefix alone is causal flash attention over P zero queries + T real ones, no
    bias; Llama's grouped key/value heads are copied out to one per query head first);
  - GPT's fused cross-entropy (``minift.fast.loss``, Llama's too): one chunk of logits at a time (1024
    positions for a frozen head, 4096 for a trained one), and the loss's input gradients
    computed in forward and kept for backward;
  - AdamW (fused): exp_avg + exp_avg_sq in fp32 per trainable parameter; fp32 gradients for
    trainable parameters only; ``zero_grad(set_to_none=True)``, so gradients exist only from
    backward to the optimizer step;
  - frozen bottom layers (``grad_from_layer``) run without autograd and keep nothing.

What backward keeps is derived from PyTorch's autograd rules by a small symbolic forward that
``estimate_memory`` runs through the model op by op (``minift.studies.memory_tape``, whose docstring
lists the rules; on CPU, ``device="cpu"``, fp32 only, the tests check it byte for byte, with
and without dropout). Attention dropout (``config.dropout``; Llama: ``attention_dropout``) is fused
into the CUDA kernels, which keep only its RNG state; on CPU, SDPA with dropout runs its math
form, which keeps the T x T attention probabilities, the dropout mask and the dropped
probabilities (plus scaled copies of q and k) in every layer, and the estimate counts them.

The peak is the larger of two moments: the end of the forward pass (weights, optimizer state,
everything saved for backward, and the loss's last chunk: its logits in bf16 and fp32 and
their bf16 gradient, 6 bytes per chunk position per vocabulary entry under autocast; or,
when larger, one block's backward temporaries) and the optimizer step (weights, gradients,
optimizer state). Memory is in bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from minift.studies.memory_tape import Forward, Net, Param, Projection, Tape
from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.models.llama import LlamaConfig

GiB = 2 ** 30
from minift.methods.registry import METHODS  # noqa: E402  (the one table of methods)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # every model's projections
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # + SwiGLU's gate
# cuBLAS workspace: allocated through PyTorch's caching allocator (so it counts in
# max_memory_allocated), one per thread issuing matmuls: forward's and autograd's backward thread
CUBLAS_WORKSPACE = 32 * 2 ** 20


# ============================================================================ estimate

@dataclass
class MemoryEstimate:
    """Bytes of one training step at its peak, by term (see the module docstring)."""
    method: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward at the end of forward
    logits: int  # loss chunk buffers and backward temporaries at the start of backward
    extras: int  # method state outside the optimizer (AdaLoRA's importance averages), workspace
    trainable_params: int
    total_params: int
    phase: str = ""
    # several ranks (``minift.studies.memory_ranks``; 0 for one process): FSDP2's gathered weights and
    # unsharded gradients during the backward, and data parallel's flat all-reduce buckets before the step
    gathered: int = 0
    comm: int = 0
    ranks: int = 1  # the estimate is of one rank of this many

    @property
    def total(self) -> int:
        """Every term added up, as if all coexisted (an upper bound of the peak)."""
        return (self.weights + self.gradients + self.optimizer_state + self.activations + self.logits + self.extras
                + self.gathered + self.comm)

    @property
    def peak(self) -> int:
        """Largest allocation during a step: start of backward or the optimizer step."""
        return max(self.backward_peak, self.step_peak)

    @property
    def backward_peak(self) -> int:
        return self.weights + self.optimizer_state + self.activations + self.logits + self.extras + self.gathered

    @property
    def step_peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.extras + self.comm

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("activations", self.activations), ("logits/loss buffers", self.logits), ("extras", self.extras),
                *((("gathered (FSDP2)", self.gathered),) if self.gathered else ()),
                *((("all-reduce buckets", self.comm),) if self.comm else ()), ("peak", self.peak)]
        when = "start of backward" if self.backward_peak >= self.step_peak else "optimizer step"
        per = f" (per rank of {self.ranks})" if self.ranks > 1 else ""
        return (f"{self.method}{per}: {self.trainable_params:,} trainable of {self.total_params:,} params\n"
                + "\n".join(f"  {k:<20} {v / GiB:9.3f} GiB" for k, v in rows) + f"  ({when})")


@dataclass
class MethodOptions:
    """The knobs of each method the estimate needs (defaults: minift's configs; the bench
    adapts all six projections)."""
    r: int = 8  # lora / dora
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # lora / dora / adalora
    lora_dropout: float = 0.0
    init_r: int = 12  # adalora
    orth_penalty: bool = True  # adalora: the orthogonality penalty is added to the loss (the bench does)
    num_virtual_tokens: int = 20  # prefix / prompt
    projection_dim: int | None = None  # prefix
    frozen_layers: int | None = None  # freeze: bottom layers frozen (None: n_layer // 2)
    freeze_embeddings: bool = True  # freeze
    num_labels: int = 2  # BERT: a BertClassifier head (trainable in every method but probe)
    attention_mask: bool | None = None  # a padding mask is passed (default: BERT yes, GPT no)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in self.targets if t not in LLAMA_PROJ]
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {', '.join(PROJ)} (and gate_proj on "
                             f"Llama); got {self.targets!r}")
        for k in ("r", "init_r", "num_virtual_tokens", "num_labels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def estimate_memory(config: GPTConfig | BertConfig | LlamaConfig, method: str, batch: int, seq_len: int,
                    dtype: str = "bf16", optimizer: str = "adamw", *, frozen_dtype: str | None = None,
                    device: str = "cuda", **method_options) -> MemoryEstimate:
    """Peak memory of one training step of ``method`` on a GPT or Llama (causal LMs) or a
    BertClassifier (``num_labels``) of ``config``, at ``batch`` x ``seq_len`` positions; as in
    the bench, prefix/prompt tuning spend P of them on virtual tokens (text = seq_len - P).
    ``dtype``: "bf16" (autocast) or "fp32"; ``frozen_dtype``: storage of frozen weights, "bf16"
    or "fp32" (default: the compute dtype); ``optimizer``: "adamw" (2 fp32 states) or "sgd"
    (none); ``method_options``: fields of ``MethodOptions``.

    Steps: check the arguments, lay out every parameter (which train, in which dtype), run the
    symbolic forward (``memory_tape.Forward``) for what backward keeps and the loss's buffers,
    then add up weights, gradients and optimizer state.

    Raises:
        ValueError: an argument out of range, or a method the model refuses (BitFit on a Llama
            without biases, as ``freeze.bitfit`` does)."""
    frozen_dtype = _check_args(config, method, batch, seq_len, dtype, optimizer, frozen_dtype, device)
    opts = MethodOptions(**method_options)
    P = opts.num_virtual_tokens if method in ("prefix", "prompt") else 0
    _check_sizes(config, method, opts, seq_len, P)
    net = _build(config, method, opts, _frozen_layers(method, opts, config.n_layer),
                 P, frozen_bytes=2 if frozen_dtype == "bf16" else 4)
    mask = opts.attention_mask if opts.attention_mask is not None else isinstance(config, BertConfig)
    tape = Tape(autocast=dtype == "bf16", cuda=device == "cuda")
    activations, logits = Forward(tape, net, config, method, batch, seq_len - P, P, mask=mask,
                                  orth_penalty=opts.orth_penalty).run()
    return _estimate(method, net, optimizer, device, activations, logits)


def _dims(cfg) -> tuple[int, int, int, int, int]:
    return cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_inner, cfg.vocab_size


# ============================================================================ checks

def _check_args(config, method, batch, seq_len, dtype, optimizer, frozen_dtype, device) -> str:
    """ValueError for an argument out of range; returns the frozen weights' dtype."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(config, (GPTConfig, BertConfig, LlamaConfig)):
        raise ValueError(f"config must be a GPTConfig, BertConfig or LlamaConfig, got {type(config).__name__}")
    if refusal(config, method) is not None:
        raise ValueError(refusal(config, method))
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    frozen_dtype = frozen_dtype or dtype
    if frozen_dtype not in ("bf16", "fp32") or (dtype == "fp32" and frozen_dtype == "bf16"):
        raise ValueError(f"frozen_dtype must be 'bf16' or 'fp32' (bf16 only with dtype='bf16'), got {frozen_dtype!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if device not in ("cuda", "cpu") or (device == "cpu" and dtype != "fp32"):
        raise ValueError(f"device must be 'cuda' or 'cpu' (cpu with dtype='fp32'), got {device!r}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch} and {seq_len}")
    return frozen_dtype


def _check_sizes(config, method: str, opts: MethodOptions, seq_len: int, P: int) -> None:
    """The sequence fits the model and leaves text after the virtual tokens; the targets exist
    in the model and their ranks fit them."""
    max_pos = config.block_size if isinstance(config, GPTConfig) else config.max_position_embeddings
    if seq_len > max_pos:
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's {max_pos} positions")
    if seq_len <= P:
        raise ValueError(f"seq_len ({seq_len}) leaves no text after {P} virtual tokens")
    shapes = _proj_shapes(config)
    for t in opts.targets if method in ("lora", "dora", "adalora") else ():
        if t not in shapes:
            raise ValueError(f"targets: {t} is not a projection of this model ({', '.join(shapes)})")
        r = opts.init_r if method == "adalora" else opts.r
        if r > min(shapes[t]):
            raise ValueError(f"rank {r} is too large for {t}")


def _proj_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a block, by name."""
    _, H, C, I, _ = _dims(config)
    if not isinstance(config, LlamaConfig):
        return {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "o_proj": (C, C), "up_proj": (C, I),
                "down_proj": (I, C)}
    A, KV = H * config.head_dim, config.n_kv_head * config.head_dim  # query heads' width, keys' width
    return {"q_proj": (C, A), "k_proj": (C, KV), "v_proj": (C, KV), "o_proj": (A, C), "gate_proj": (C, I),
            "up_proj": (C, I), "down_proj": (I, C)}


def _llama_biases(cfg: LlamaConfig) -> dict[str, bool]:
    """Which of a Llama block's projections have a bias (none by default; Qwen2: q, k, v)."""
    qkv = cfg.attention_bias or cfg.qkv_bias
    return {n: b for n, b in (("q_proj", qkv), ("k_proj", qkv), ("v_proj", qkv), ("o_proj", cfg.attention_bias),
                              ("gate_proj", cfg.mlp_bias), ("up_proj", cfg.mlp_bias),
                              ("down_proj", cfg.mlp_bias)) if b}


def refusal(config, method: str) -> str | None:
    """Why a model of ``config`` refuses ``method`` (None: it takes it): BitFit trains bias terms,
    and a Llama without attention or MLP biases has none (``freeze.bitfit`` refuses it too)."""
    if method == "bitfit" and isinstance(config, LlamaConfig) and not _llama_biases(config):
        return "BitFit trains bias terms and this Llama has none (no attention or MLP biases)"
    return None


def _frozen_layers(method: str, opts: MethodOptions, L: int) -> int:
    """How many bottom blocks layer-wise freezing freezes (0 for every other method)."""
    n_frozen = {"freeze": L // 2 if opts.frozen_layers is None else opts.frozen_layers}.get(method, 0)
    if not 0 <= n_frozen <= L:
        raise ValueError(f"frozen_layers must be in [0, {L}], got {n_frozen}")
    return n_frozen


# ============================================================================ the parameters

class _Params:
    """Every parameter of the adapted model as the estimate sees it (elements, bytes, trains?).
    Which ones train mirrors full.apply, lora.apply, prefix/prompt.apply and freeze.apply/bitfit."""

    def __init__(self, method: str, opts: MethodOptions, n_frozen: int, frozen_bytes: int):
        self.method, self.opts, self.n_frozen, self.fb = method, opts, n_frozen, frozen_bytes
        self.all: list[Param] = []

    def new(self, n: int, trainable: bool) -> Param:
        p = Param(n, 4 if trainable else self.fb, trainable)
        self.all.append(p)
        return p

    def w_train(self, layer: int | None) -> bool:
        """Whether the weights (not biases) of block ``layer`` train; None: the embeddings."""
        if self.method == "full":
            return True
        if self.method == "freeze":
            return not self.opts.freeze_embeddings if layer is None else layer >= self.n_frozen
        return False

    def b_train(self, layer: int | None) -> bool:
        return self.method == "bitfit" or self.w_train(layer)

    def linear(self, fin: int, fout: int, layer: int, name: str, bias: bool = True) -> Projection:
        """A projection of block ``layer``, with its adapter factors when ``name`` is a target."""
        li = Projection(fin, fout, self.new(fin * fout, self.w_train(layer)),
                        self.new(fout, self.b_train(layer)) if bias else None)
        if self.method in ("lora", "dora", "adalora") and name in self.opts.targets:
            r = self.opts.init_r if self.method == "adalora" else self.opts.r
            shapes = {"lora": (r * fin, fout * r), "dora": (r * fin, fout * r, fout),
                      "adalora": (r * fin, r, fout * r)}[self.method]
            li.adapter, li.kind = tuple(self.new(n, True) for n in shapes), self.method
            li.dropout = self.opts.lora_dropout
        return li

    def layer_norm(self, C: int, layer: int | None) -> tuple[Param, Param]:
        return self.new(C, self.w_train(layer)), self.new(C, self.b_train(layer))


def _build(config, method: str, opts: MethodOptions, n_frozen: int, P: int, frozen_bytes: int) -> Net:
    """Lay out every parameter of ``config``'s model with ``method`` applied."""
    L, _, C, I, V = _dims(config)
    ps = _Params(method, opts, n_frozen, frozen_bytes)
    llama = isinstance(config, LlamaConfig)
    biases = _llama_biases(config) if llama else dict.fromkeys(PROJ, True)
    blocks = []
    for i in range(L):
        blk = {n: ps.linear(fin, fout, i, n, biases.get(n, False)) for n, (fin, fout) in _proj_shapes(config).items()}
        if llama:  # RMSNorm: a weight (a scale), no bias
            blk["ln_1"], blk["ln_2"] = (ps.new(C, ps.w_train(i)),), (ps.new(C, ps.w_train(i)),)
        else:
            blk["ln_1"], blk["ln_2"] = ps.layer_norm(C, i), ps.layer_norm(C, i)
        blocks.append(blk)
    top = method == "full" or (method == "freeze" and n_frozen < L) or method == "bitfit"
    bitfit = method == "bitfit"
    if llama:  # the final norm and an untied head follow the top block; a tied head is embed_tokens
        emb = [ps.new(V * C, ps.w_train(None))]
        net = Net(ps.all, blocks, emb, ln_f=(ps.new(C, top and not bitfit),),
                  lm_head=None if config.tie_word_embeddings else ps.new(V * C, top and not bitfit))
    elif isinstance(config, GPTConfig):
        emb = [ps.new(V * C, ps.w_train(None)), ps.new(config.block_size * C, ps.w_train(None))]
        net = Net(ps.all, blocks, emb, ln_f=(ps.new(C, top and not bitfit), ps.new(C, top)))
    else:
        emb = [ps.new(V * C, ps.w_train(None)), ps.new(config.max_position_embeddings * C, ps.w_train(None)),
               ps.new(config.type_vocab_size * C, ps.w_train(None)), *ps.layer_norm(C, None)]
        k = opts.num_labels
        net = Net(ps.all, blocks, emb, pooler=Projection(C, C, ps.new(C * C, top and not bitfit), ps.new(C, top)),
                  head=Projection(C, k, ps.new(C * k, method != "probe"), ps.new(k, method != "probe")))
    d, D = opts.projection_dim, _proj_shapes(config)["k_proj"][1]  # D: one layer's keys per token
    if method == "prefix":  # the (P, 2LD) table, or E (P, D) and the MLP D -> d -> 2LD
        for n in (P * 2 * L * D,) if d is None else (P * D, D * d, d, d * 2 * L * D, 2 * L * D):
            ps.new(n, True)
    if method == "prompt":
        ps.new(P * C, True)
    net.grad_from = _grad_from(method, net)
    return net


def _grad_from(method: str, net: Net) -> int:
    """freeze.sync_grad_from_layer: the first block with a trainable parameter when the embeddings
    are frozen; only the freezing methods set it."""
    emb_train = any(p.grad for p in net.emb)
    first = next((i for i, blk in enumerate(net.blocks) if any(
        p.grad for v in blk.values() for p in ((v.w, v.b, *v.adapter) if isinstance(v, Projection) else v) if p)),
        len(net.blocks))
    return first if method in ("freeze", "bitfit") and not emb_train else 0


# ============================================================================ totals

def _estimate(method: str, net: Net, optimizer: str, device: str, activations: int, logits: int) -> MemoryEstimate:
    """Weights, gradients, optimizer state and extras from the parameters, with the forward's terms."""
    params = list({id(p): p for p in net.params}.values())
    total = sum(p.n for p in params)
    weights = sum(p.n * p.b for p in params)
    trainable = sum(p.n for p in params if p.grad)
    n_tensors = sum(1 for p in params if p.grad)
    state = (8 * trainable + 4 * n_tensors) if optimizer == "adamw" else 0  # exp_avg, exp_avg_sq, step
    extras = CUBLAS_WORKSPACE * (1 if method == "probe" else 2) if device == "cuda" else 0
    if method == "adalora":  # RankAllocator: two fp32 EMAs per adapter tensor, two temporaries while updating
        extras += 4 * 4 * sum(p.n for ad in net.adapters() for p in ad)
    est = MemoryEstimate(method, weights, 4 * trainable, state, activations, logits, extras, trainable, total)
    if method == "probe":  # no backward, no optimizer: the peak is inside the forward
        est.phase = "forward"
    else:
        est.phase = "start of backward" if est.backward_peak >= est.step_peak else "optimizer step"
    return est
