"""Memory estimator: the peak bytes of one fine-tuning step of a method, without running it.

The training step the estimate models (the one ``minift.studies.bench`` runs and
``benchmarks/advisor_check.py`` measures on a GPU):
  - parameters: trainable ones fp32 (master weights); frozen ones in ``frozen_dtype``
    (the bench stores them in bf16 for every method; a frozen bf16 embedding makes the
    residual stream bf16, the estimate follows those dtypes op by op);
  - forward under ``torch.autocast("cuda", dtype=torch.bfloat16)``: matmuls and SDPA in bf16
    (the models cast the attention input and the MLP input once (``cast_once``), one bf16
    copy shared by q, k, v, up_proj and their LoRA A / AdaLoRA factors; any other fp32 input
    is cast anew for every matmul; fp32 trainable weights once per forward through
    autocast's cache), LayerNorm in fp32; SDPA flash attention (no T x T matrix kept;
    memory-efficient attention with an additive bias when a mask is present; a GPT prefix alone
    is causal flash attention over P zero queries + T real ones, no bias);
  - GPT's fused cross-entropy (``minift.fast.loss``): one chunk of logits at a time (1024
    positions for a frozen head, 4096 for a trained one), and the loss's input gradients computed in forward and kept for backward;
  - AdamW (fused): exp_avg + exp_avg_sq in fp32 per trainable parameter; fp32 gradients for
    trainable parameters only; ``zero_grad(set_to_none=True)``, so gradients exist only from
    backward to the optimizer step;
  - frozen bottom layers (``grad_from_layer``) run without autograd and keep nothing.

What backward keeps is derived from PyTorch's autograd rules by a small symbolic forward that
``estimate_memory`` runs through the model op by op (``minift.studies.memory_tape``, whose docstring
lists the rules; on CPU, ``device="cpu"``, fp32 only, the tests check it byte for byte, with
and without dropout). Attention dropout (``config.dropout``, as the models apply it) is fused
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

from minift.studies.memory_tape import Param, Tape
from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.fast.loss import loss_chunk

GiB = 2 ** 30
METHODS = ("full", "lora", "dora", "adalora", "prefix", "prompt", "freeze", "bitfit", "probe")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
# cuBLAS workspace: allocated through PyTorch's caching allocator (so it counts in
# max_memory_allocated), one per thread issuing matmuls: forward's and autograd's backward thread
CUBLAS_WORKSPACE = 32 * 2 ** 20


# ============================================================================ estimate

@dataclass
class _Lin:
    fin: int
    fout: int
    w: Param
    b: Param | None
    adapter: tuple[Param, ...] = ()  # LoRA (A, B[, magnitude]) or AdaLoRA (A, E, B)
    kind: str = ""  # "", "lora", "dora", "adalora"


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

    @property
    def total(self) -> int:
        """Every term added up, as if all coexisted (an upper bound of the peak)."""
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.logits + self.extras

    @property
    def peak(self) -> int:
        """Largest allocation during a step: start of backward or the optimizer step."""
        return max(self.backward_peak, self.step_peak)

    @property
    def backward_peak(self) -> int:
        return self.weights + self.optimizer_state + self.activations + self.logits + self.extras

    @property
    def step_peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.extras

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("activations", self.activations), ("logits/loss buffers", self.logits), ("extras", self.extras),
                ("peak", self.peak)]
        when = "start of backward" if self.backward_peak >= self.step_peak else "optimizer step"
        return (f"{self.method}: {self.trainable_params:,} trainable of {self.total_params:,} params\n"
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
        bad = [t for t in self.targets if t not in PROJ]
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {', '.join(PROJ)}; got {self.targets!r}")
        for k in ("r", "init_r", "num_virtual_tokens", "num_labels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def _dims(cfg) -> tuple[int, int, int, int, int]:
    return cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_inner, cfg.vocab_size


def estimate_memory(config: GPTConfig | BertConfig, method: str, batch: int, seq_len: int, dtype: str = "bf16",
                    optimizer: str = "adamw", *, frozen_dtype: str | None = None, device: str = "cuda",
                    **method_options) -> MemoryEstimate:
    """Peak memory of one training step of ``method`` on a GPT (causal LM) or a
    BertClassifier (``num_labels``) of ``config``, at ``batch`` x ``seq_len`` positions; as in
    the bench, prefix/prompt tuning spend P of them on virtual tokens (text = seq_len - P). ``dtype``: "bf16" (autocast) or
    "fp32"; ``frozen_dtype``: storage of frozen weights, "bf16" or "fp32" (default: the
    compute dtype); ``optimizer``: "adamw" (2 fp32 states) or "sgd" (none);
    ``method_options``: fields of ``MethodOptions``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(config, (GPTConfig, BertConfig)):
        raise ValueError(f"config must be a GPTConfig or BertConfig, got {type(config).__name__}")
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
    opts = MethodOptions(**method_options)
    gpt = isinstance(config, GPTConfig)
    L, H, C, I, V = _dims(config)
    P = opts.num_virtual_tokens if method in ("prefix", "prompt") else 0
    max_pos = config.block_size if gpt else config.max_position_embeddings
    if seq_len > max_pos:
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's {max_pos} positions")
    if seq_len <= P:
        raise ValueError(f"seq_len ({seq_len}) leaves no text after {P} virtual tokens")
    seq_len -= P  # text tokens
    for t in opts.targets if method in ("lora", "dora", "adalora") else ():
        r = opts.init_r if method == "adalora" else opts.r
        if r > (C if t != "up_proj" and t != "down_proj" else min(C, I)):
            raise ValueError(f"rank {r} is too large for {t}")
    tape = Tape(autocast=dtype == "bf16", cuda=device == "cuda")
    fb = 2 if frozen_dtype == "bf16" else 4
    params: list[Param] = []

    def param(n: int, trainable: bool) -> Param:
        p = Param(n, 4 if trainable else fb, trainable)
        params.append(p)
        return p

    # ---- which parameters train: mirrors full.apply, lora.apply, prefix/prompt.apply, freeze.apply/bitfit
    n_frozen = {"freeze": L // 2 if opts.frozen_layers is None else opts.frozen_layers}.get(method, 0)
    if not 0 <= n_frozen <= L:
        raise ValueError(f"frozen_layers must be in [0, {L}], got {n_frozen}")
    bitfit = method == "bitfit"

    def w_train(layer: int | None) -> bool:  # weights (not biases) of a block, or None for embeddings
        if method == "full":
            return True
        if method == "freeze":
            return not opts.freeze_embeddings if layer is None else layer >= n_frozen
        return False

    def b_train(layer: int | None) -> bool:
        return bitfit or w_train(layer)

    def lin(fin, fout, layer, name, bias=True) -> _Lin:
        li = _Lin(fin, fout, param(fin * fout, w_train(layer)), param(fout, b_train(layer)) if bias else None)
        if method in ("lora", "dora", "adalora") and name in opts.targets:
            r = opts.init_r if method == "adalora" else opts.r
            shapes = {"lora": (r * fin, fout * r), "dora": (r * fin, fout * r, fout),
                      "adalora": (r * fin, r, fout * r)}[method]
            li.adapter, li.kind = tuple(param(n, True) for n in shapes), method
        return li

    def ln(layer):
        return param(C, w_train(layer)), param(C, b_train(layer))

    blocks = []
    for i in range(L):
        blk = {n: lin(C, C, i, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        blk["up_proj"], blk["down_proj"] = lin(C, I, i, "up_proj"), lin(I, C, i, "down_proj")
        blk["ln_1"], blk["ln_2"] = ln(i), ln(i)
        blocks.append(blk)
    top = method == "full" or (method == "freeze" and n_frozen < L) or bitfit
    if gpt:
        emb = [param(V * C, w_train(None)), param(config.block_size * C, w_train(None))]
        ln_f = (param(C, top and not bitfit), param(C, top))
    else:
        emb = [param(V * C, w_train(None)), param(max_pos * C, w_train(None)),
               param(config.type_vocab_size * C, w_train(None)), *ln(None)]
        pooler = _Lin(C, C, param(C * C, top and not bitfit), param(C, top))
        head = _Lin(C, opts.num_labels, param(C * opts.num_labels, method != "probe"),
                    param(opts.num_labels, method != "probe"))
    d = opts.projection_dim
    if method == "prefix":  # the (P, 2LC) table, or E (P, C) and the MLP C -> d -> 2LC
        sizes = (P * 2 * L * C,) if d is None else (P * C, C * d, d, d * 2 * L * C, 2 * L * C)
        for n in sizes:
            param(n, True)
    if method == "prompt":
        param(P * C, True)
    # grad_from_layer (freeze.sync_grad_from_layer): first block with a trainable parameter
    # when the embeddings are frozen; only freezing methods set it
    emb_train = any(p.grad for p in emb)
    first = next((i for i, blk in enumerate(blocks) if any(
        p.grad for v in blk.values() for p in ((v.w, v.b, *v.adapter) if isinstance(v, _Lin) else v) if p)), L)
    grad_from = first if method in ("freeze", "bitfit") and not emb_train else 0

    # ---- the forward, op by op
    B, T = batch, seq_len
    mask = opts.attention_mask if opts.attention_mask is not None else not gpt
    Tq = T + (P if method == "prompt" else 0)  # positions the blocks see
    S = Tq + (P if method == "prefix" else 0)  # keys per query
    rows = B * Tq
    if method == "probe":
        tape.no_grad = True

    def linear(x, li: _Lin):
        if not li.kind:
            return tape.linear(x, li.w, li.b, li.fin, li.fout)
        if li.kind == "adalora":  # x @ (A * E)^T @ B^T: the product A*E is a small (r, in) tensor
            a, _, bw = li.adapter
            a = tape.new(a.n, 4, True)  # A * E keeps A and E (parameters: nothing new)
        else:
            a, bw = li.adapter[:2]
        r = a.n // li.fin
        lo = tape.linear(tape.linear(tape.dropout(x, opts.lora_dropout), a, None, li.fin, r), bw, None, r, li.fout)
        lo = tape.new(lo.n, lo.b, lo.grad)  # * scaling (a Python float: nothing saved)
        if li.kind != "dora":
            return tape.add(tape.linear(x, li.w, li.b, li.fin, li.fout), lo)
        # DoRA as lora.py writes it: base + (f - 1) * (base - b) + f * lora, f = m / ||W0 + sBA||, the norm
        # computed without a graph; the division keeps the norm (out,) for m's gradient
        tape.save(tape.new(li.fout, 4))
        base = tape.linear(x, li.w, li.b, li.fin, li.fout)
        # the factor (f - 1, f) and the bias are cast to the output's dtype
        nobias = tape.new(base.n, base.b, base.grad) if li.b is not None else base
        scaled = tape.mul(tape.new(li.fout, base.b, True), nobias)
        return tape.add(tape.add(base, scaled), tape.mul(tape.new(li.fout, base.b, True), lo))

    ids_grad = emb[0].grad
    if ids_grad:
        tape.save(tape.new(B * T, 8))  # token ids kept by the embedding
    if gpt:
        if emb[1].grad:
            tape.save(tape.new(T, 8))  # positions
        tok = tape.new(B * T * C, emb[0].b, emb[0].grad)
        if method == "prompt":
            tok = tape.new(B * Tq * C, tok.b, True)  # cat([prompt.to(dtype), wte(ids)])
        x = tape.dropout(tape.add(tok, tape.new(Tq * C, emb[1].b, emb[1].grad)), config.dropout)
    else:
        if emb[1].grad:
            tape.save(tape.new(Tq, 8), tape.new(B * Tq, 8))  # position and token-type ids
        x = tape.new(B * T * C, emb[0].b, emb[0].grad)
        if method == "prompt":
            x = tape.new(B * Tq * C, x.b, True)
        x = tape.add(tape.add(x, tape.new(Tq * C, emb[1].b, emb[1].grad)), tape.new(rows * C, emb[2].b, emb[2].grad))
        x = tape.dropout(tape.layer_norm(x, emb[3], emb[4], C), config.dropout)
    bias = None
    if mask:
        bias = tape.new(B * Tq * S, x.b)  # additive bias in the residual's dtype
    # a GPT prefix without a mask (gpt.prefix_attention): with P <= T, P zero queries in front and
    # square causal attention; with P > T the bottom-right causal mask (flash on CUDA keeps no mask,
    # the CPU kernel keeps the one it materializes in each layer)
    lone = bool(P and gpt and method == "prefix" and not mask and Tq > 1)
    padded, lower_right = lone and P <= Tq, lone and P > Tq and not tape.cuda

    def attention(x, blk):
        x = tape.cast_once(x)  # one bf16 copy for q, k, v and their adapters (BERT's residual keeps x)
        q, k, v = (linear(x, blk[n]) for n in ("q_proj", "k_proj", "v_proj"))
        if method == "prefix":  # cat([prefix.to(bf16), k]): (B, nh, P+T, hs), needs a gradient
            k, v = tape.new(B * S * C, k.b, True), tape.new(B * S * C, v.b, True)
        if padded:  # cat([zeros, q]) in, (B, nh, P+T, hs) out, the last T rows taken (a copy for o_proj)
            out = tape.sdpa(tape.new(B * S * C, q.b, q.grad), k, v, None, B, H, S, C, config.dropout)
            out = tape.new(B * Tq * C, out.b, out.grad)
        else:
            out = tape.sdpa(q, k, v, tape.new(Tq * S, x.b) if lower_right else bias, B, H, Tq, C, config.dropout)
        return linear(out, blk["o_proj"])

    def mlp(x, blk):
        return linear(tape.pointwise(linear(tape.cast_once(x), blk["up_proj"])), blk["down_proj"])

    hidden = [x]
    for i, blk in enumerate(blocks):
        tape.no_grad = method == "probe" or (i < grad_from and not x.grad and method != "prefix")
        if gpt:
            x = tape.add(x, tape.dropout(attention(tape.layer_norm(x, *blk["ln_1"], C), blk), config.dropout))
            x = tape.add(x, tape.dropout(mlp(tape.layer_norm(x, *blk["ln_2"], C), blk), config.dropout))
        else:
            x = tape.layer_norm(tape.add(x, tape.dropout(attention(x, blk), config.dropout)), *blk["ln_1"], C)
            x = tape.layer_norm(tape.add(x, tape.dropout(mlp(x, blk), config.dropout)), *blk["ln_2"], C)
        hidden.append(x)
    tape.no_grad = method == "probe"
    act_b = 2 if tape.ac else 4
    kept = sum(h.n * h.b for h in hidden)  # probing keeps every layer's hidden state
    if gpt:
        x = tape.layer_norm(x, *ln_f, C)
        n_pos = B * (Tq - 1)
        Vp = -(-V // 64) * 64  # lm_loss pads the vocabulary to a multiple of 64
        head_grad = emb[0].grad and n_pos > 0  # with one position there is nothing to predict: a zero loss
        x_grad = x.grad and n_pos > 0
        if x_grad or head_grad:  # the division by the target count keeps the count (int64)
            tape.save(tape.new(1, 8))
        if x_grad:  # lm_loss computes d(loss)/dx in forward and keeps it for backward
            tape.save(tape.new(n_pos * C, 2 if tape.ac else x.b))
        if head_grad:  # ... and d(loss)/d(head), accumulated in fp32 over the padded vocabulary
            tape.save(tape.new(Vp * C, 4))
        c = min(loss_chunk(head_grad), n_pos)
        # inside the loss's forward, on top of what is kept: the shifted x (a copy unless B == 1), the
        # head cast and/or padded (a copy), one chunk's logits (bf16 matmul output and its fp32 copy, then
        # the bf16 d(logits) while the fp32 one is alive) and the head-gradient chunk
        shifted = n_pos * C * act_b if B > 1 or tape.ac else 0
        head = Vp * C * (2 if tape.ac else 4) if n_pos and (Vp != V or (tape.ac and emb[0].b == 4)) else 0
        chunk = c * Vp * (6 if tape.ac else 4)
        head_chunk = Vp * C * (2 if tape.ac else 4) if head_grad else 0
        logits = shifted + head + chunk + head_chunk
    else:
        cls = tape.new(B * C, x.b, x.grad)  # x[:, 0]
        pooled = tape.pointwise(tape.linear(cls, pooler.w, pooler.b, C, C), save_input=False)
        if not tape.ac and tape.saved.pop(id(cls), None):  # fp32: the kept input is a view of x
            tape.save(x)
        out = tape.linear(tape.dropout(pooled, config.dropout), head.w, head.b, C, opts.num_labels)
        if out.grad:
            tape.save(tape.new(B * opts.num_labels, 4), tape.new(B, 8), tape.new(1, 4))  # log-softmax, labels, weight
        logits = 0
    adapters = [v.adapter for blk in blocks for v in blk.values() if isinstance(v, _Lin) and v.adapter]
    if method == "adalora" and opts.orth_penalty:  # A A^T and B^T B over stacked copies of A and B
        tape.save(*(tape.bf16(tape.new(p.n, 4, True)) for ad in adapters for p in (ad[0], ad[2])))
        tape.save(*(tape.new(ad[1].n ** 2, 4) for ad in adapters for _ in "AB"))  # (. - I) ** 2 keeps its input
    activations = sum(tape.saved.values())
    # backward temporaries of a block: gradients of the residual (fp32 in, out) and of the MLP
    logits = max(logits, 2 * rows * C * 4 + 2 * rows * I * act_b) if method != "probe" else 0
    if method == "probe":  # forward only: every layer's hidden states kept, one block's temporaries
        activations = kept + (rows * C * (x.b - hidden[-1].b) if gpt else 0)  # GPT: last one after ln_f
        logits = rows * C * (4 + 2 + 2) + 2 * rows * I * act_b
    seen, trainable, total, weights = set(), 0, 0, 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.n
            weights += p.n * p.b
            trainable += p.n if p.grad else 0
    n_tensors = sum(1 for p in {id(p): p for p in params}.values() if p.grad)
    state = (8 * trainable + 4 * n_tensors) if optimizer == "adamw" else 0  # exp_avg, exp_avg_sq, step
    extras = CUBLAS_WORKSPACE * (1 if method == "probe" else 2) if device == "cuda" else 0
    if method == "adalora":  # RankAllocator: two fp32 EMAs per adapter tensor, two temporaries while updating
        extras += 4 * 4 * sum(p.n for ad in adapters for p in ad)
    est = MemoryEstimate(method, weights, 4 * trainable, state, activations, logits, extras, trainable, total)
    if method == "probe":  # no backward, no optimizer: the peak is inside the forward
        est.phase = "forward"
    else:
        est.phase = "start of backward" if est.backward_peak >= est.step_peak else "optimizer step"
    return est
