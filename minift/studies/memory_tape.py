"""The memory estimator's symbolic forward: a tape that records, op by op, the bytes autograd
saves for backward, without running anything, and ``Forward``, one training step of a GPT, Llama
or BertClassifier written in those ops (``minift.studies.memory`` lays out the parameters and runs it).

Each op mirrors PyTorch's autograd and autocast rules: a matmul keeps its (bf16) input when its
weight trains and its (bf16) weight when its input needs a gradient; LayerNorm keeps its fp32
input, mean and rstd; RMSNorm as Llama writes it (x.float(), pow, mean, rsqrt, two products) its
fp32 input and 1/rms, and its normalized input when its weight trains; GELU and SiLU their
input; a product each factor the other's gradient needs (RoPE: the cos and sin tables, once for
the whole model); SDPA q, k, v, out and logsumexp (+ the bias), its
attention dropout fused into the kernel, which keeps only its RNG state (a few bytes, not
counted); dropout with p > 0 its mask (bool on CUDA). Views share storage and are counted once
(the caller saves the tensor a view is of). On CPU (``cuda=False``, no autocast) the same rules
hold except that dropout masks have the input's dtype and SDPA with attention dropout runs its
math form, which keeps T x S tensors (``Tape.sdpa`` lists them); the tests check that form
against ``torch.autograd.graph.saved_tensors_hooks`` byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass

from minift.fast.loss import loss_chunk
from minift.models.gpt import GPTConfig
from minift.models.llama import LlamaConfig


class Tracked:
    """A tensor the estimate tracks: element count, bytes per element, needs a gradient."""
    __slots__ = ("n", "b", "grad")

    def __init__(self, n: int, b: int, grad: bool = False):
        self.n, self.b, self.grad = n, b, grad


class Param(Tracked):
    """A parameter: already counted under weights, never again when saved for backward."""
    __slots__ = ()


class Tape:
    """Symbolic forward: records the bytes autograd saves for backward (unique tensors)."""

    def __init__(self, autocast: bool, cuda: bool):
        self.ac, self.cuda, self.no_grad = autocast, cuda, False
        self.saved: dict[int, int] = {}
        self.alive: list[Tracked] = []  # keeps every Tracked alive so ids stay unique
        self.cache: dict[int, Tracked] = {}  # autocast's cache of trainable-weight casts

    def new(self, n, b, grad=False) -> Tracked:
        t = Tracked(int(n), b, grad and not self.no_grad)
        self.alive.append(t)
        return t

    def save(self, *ts) -> None:
        for t in ts:
            if not self.no_grad and not isinstance(t, Param):
                self.saved[id(t)] = t.n * t.b

    def bf16(self, t: Tracked) -> Tracked:  # autocast's cast for a lower-precision op: a new copy per consumer
        if not self.ac or t.b == 2:
            return t
        if isinstance(t, Param) and t.grad:
            return self.cache.setdefault(id(t), self.new(t.n, 2, True))
        return self.new(t.n, 2, t.grad)

    def cast_once(self, x: Tracked) -> Tracked:
        """``minift.models.gpt.cast_once``: under autocast, one bf16 copy of a matmul input
        that every consumer (q, k, v, each LoRA A) then shares; without autocast, ``x`` itself."""
        return self.bf16(x)

    def linear(self, x: Tracked, w: Param, b: Param | None, fin: int, fout: int) -> Tracked:
        x16, w16 = self.bf16(x), self.bf16(w)
        grad = x.grad or w.grad or (b is not None and b.grad)
        if grad and w.grad:
            self.save(x16)
        if grad and x.grad:
            self.save(w16)
        return self.new(x.n // fin * fout, 2 if self.ac else x.b, grad)

    def layer_norm(self, x: Tracked, w: Param, b: Param, C: int) -> Tracked:
        grad = x.grad or w.grad or b.grad
        cast = (lambda t: t if t.b == 4 else self.new(t.n, 4, t.grad)) if self.ac else (lambda t: t)
        if grad:
            self.save(cast(x), cast(w), cast(b), self.new(x.n // C, 4), self.new(x.n // C, 4))
        return self.new(x.n, 4 if self.ac else x.b, grad)

    def rms_norm(self, x: Tracked, w: Param, C: int) -> Tracked:
        """Llama's RMSNorm: h = x.float() (x itself when fp32); h * rsqrt(mean(h^2) + eps) keeps h
        (pow's input) and 1/rms (one fp32 per row); cast back to x's dtype, times the weight."""
        h = x if x.b == 4 else self.new(x.n, 4, x.grad)
        if x.grad:
            self.save(h, self.new(x.n // C, 4))
        hn = self.new(x.n, 4, x.grad)
        return self.mul(w, hn if x.b == 4 else self.new(x.n, x.b, x.grad))

    def pointwise(self, x: Tracked, save_input: bool = True) -> Tracked:  # GELU saves its input, tanh its output
        out = self.new(x.n, x.b, x.grad)
        if x.grad:
            self.save(x if save_input else out)
        return out

    def dropout(self, x: Tracked, p: float) -> Tracked:
        if p == 0:
            return x  # F.dropout with p = 0 returns its input
        if x.grad:
            self.save(self.new(x.n, 1 if self.cuda else x.b))
        return self.new(x.n, x.b, x.grad)

    def add(self, a: Tracked, b: Tracked) -> Tracked:
        return self.new(max(a.n, b.n), max(a.b, b.b), a.grad or b.grad)

    def mul(self, a: Tracked, b: Tracked) -> Tracked:
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return self.add(a, b)

    def matmul(self, a: Tracked, b: Tracked, n: int) -> Tracked:
        """``a @ b`` with ``n`` output elements: keeps a for b's gradient, b for a's."""
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(n, a.b, a.grad or b.grad)

    def sdpa(self, q, k, v, bias, B: int, H: int, T: int, C: int, dropout: float = 0.0) -> Tracked:
        q, k, v = self.bf16(q), self.bf16(k), self.bf16(v)
        grad = q.grad or k.grad or v.grad
        if dropout and not self.cuda:
            # CPU's fused kernel takes no dropout, so SDPA runs its math form op by op: softmax(q s^.5
            # @ (k s^.5)^T + bias) -> dropout -> @ v. It keeps the scaled q and k (copies), the T x S
            # probabilities, the dropout mask, the dropped probabilities and v; the bias or causal
            # mask is added without being kept. (CUDA's kernels fuse dropout and keep only its RNG state.)
            S = k.n // (B * C)
            qs, ks = self.new(q.n, q.b, q.grad), self.new(k.n, k.b, k.grad)
            probs = self.pointwise(self.matmul(qs, ks, B * H * T * S), save_input=False)  # softmax keeps its output
            return self.matmul(self.dropout(probs, dropout), v, B * T * C)
        out = self.new(B * T * C, q.b, grad)
        if grad:
            lse_T = -(-T // 32) * 32 if (bias is not None and self.cuda) else T  # efficient attention pads
            self.save(q, k, v, out, self.new(B * H * lse_T, 4))
            if bias is not None:
                self.save(self.bf16(bias))
        return out


# ============================================================================ the model, op by op

@dataclass
class Projection:
    """A linear layer: its weight and bias, and its adapter factors when it has one."""
    fin: int
    fout: int
    w: Param
    b: Param | None
    adapter: tuple[Param, ...] = ()  # LoRA (A, B[, magnitude]) or AdaLoRA (A, E, B)
    kind: str = ""  # "", "lora", "dora", "adalora"
    dropout: float = 0.0  # on the adapter's input


@dataclass
class Net:
    """The model the forward walks: blocks of projections and LayerNorms, embeddings, the top."""
    params: list[Param]
    blocks: list[dict]
    emb: list[Param]  # wte, wpe (GPT); + token types, LayerNorm weight and bias (BERT); embed_tokens (Llama)
    ln_f: tuple[Param, ...] | None = None  # GPT: LayerNorm weight, bias; Llama: RMSNorm weight
    lm_head: Param | None = None  # an untied LM head (Llama); None: the token embedding
    pooler: Projection | None = None  # BERT
    head: Projection | None = None  # BERT's classifier
    grad_from: int = 0  # freeze.sync_grad_from_layer: blocks below it run without autograd

    def adapters(self) -> list[tuple[Param, ...]]:
        return [v.adapter for blk in self.blocks for v in blk.values()
                if isinstance(v, Projection) and v.adapter]


class Forward:
    """One training forward of ``net`` (a GPT, Llama or BertClassifier of ``config`` with ``method``
    applied) on ``tape``: ``batch`` x ``T`` text tokens, P virtual ones, a padding ``mask`` or
    none, AdaLoRA's ``orth_penalty`` or none."""

    def __init__(self, tape: Tape, net: Net, config, method: str, batch: int, T: int, P: int, *,
                 mask: bool, orth_penalty: bool):
        self.llama = isinstance(config, LlamaConfig)  # Llama: no hidden dropout, attention's own
        self.p = 0.0 if self.llama else config.dropout  # dropout on hidden states
        self.p_attn = config.attention_dropout if self.llama else config.dropout  # inside SDPA
        self.tape, self.net, self.method = tape, net, method
        self.gpt = isinstance(config, GPTConfig)
        self.causal = self.gpt or self.llama  # causal attention, GPT's LM loss
        self.H, self.C, self.I, self.V = config.n_head, config.n_embd, config.n_inner, config.vocab_size
        self.hs = config.head_dim if self.llama else self.C // self.H
        self.A = self.H * self.hs  # the query heads' width: C, unless a Llama's head_dim says otherwise
        self.KV = config.n_kv_head * self.hs if self.llama else self.C  # keys per token (GQA: fewer)
        self.B, self.T, self.P = batch, T, P
        self.mask, self.orth = mask, orth_penalty
        self.Tq = T + (P if method == "prompt" else 0)  # positions the blocks see
        self.S = self.Tq + (P if method == "prefix" else 0)  # keys per query
        self.rows = batch * self.Tq
        # a GPT or Llama prefix without a mask (layers.prefix_attention): with P <= T, P zero queries in front and
        # square causal attention; with P > T the bottom-right causal mask (flash on CUDA keeps no mask,
        # the CPU kernel keeps the one it materializes in each layer)
        lone = bool(P and self.causal and method == "prefix" and not self.mask and self.Tq > 1)
        self.padded, self.lower_right = lone and P <= self.Tq, lone and P > self.Tq and not tape.cuda
        self.bias = None

    def run(self) -> tuple[int, int]:
        """(bytes saved for backward at the end of forward, bytes of the loss's buffers or of one
        block's backward temporaries, whichever is larger)."""
        tape, probe = self.tape, self.method == "probe"
        tape.no_grad = probe
        x = self.embed()
        if self.mask:
            self.bias = tape.new(self.B * self.Tq * self.S, x.b)  # additive bias in the residual's dtype
        hidden = [x]
        for i, blk in enumerate(self.net.blocks):
            tape.no_grad = probe or (i < self.net.grad_from and not x.grad and self.method != "prefix")
            x = self.block(x, blk)
            hidden.append(x)
        tape.no_grad = probe
        if self.llama:
            x = tape.rms_norm(x, *self.net.ln_f, self.C)
        elif self.gpt:
            x = tape.layer_norm(x, *self.net.ln_f, self.C)
        logits = self.lm_loss(x) if self.causal else self.classifier_loss(x)
        if self.method == "adalora" and self.orth:
            self.orth_penalty()
        act_b, rows = 2 if tape.ac else 4, self.rows
        mlp = (3 if self.llama else 2) * rows * self.I * act_b  # SwiGLU: gate, up and their product
        if probe:  # forward only: every layer's hidden states kept, one block's temporaries
            kept = sum(h.n * h.b for h in hidden) + (rows * self.C * (x.b - hidden[-1].b) if self.causal else 0)
            return kept, rows * self.C * (4 + 2 + 2) + mlp  # GPT, Llama: the last one after the final norm
        # backward temporaries of a block: gradients of the residual (fp32 in, out) and of the MLP
        return sum(tape.saved.values()), max(logits, 2 * rows * self.C * 4 + mlp)

    def embed(self) -> Tracked:
        """Token (+ position, + token type) embeddings, the soft prompt in front, dropout (BERT: LayerNorm);
        Llama: RoPE's cos and sin tables (Tq, hs) in the embeddings' dtype, made once for every layer."""
        tape, emb, B, T, Tq, C = self.tape, self.net.emb, self.B, self.T, self.Tq, self.C
        if emb[0].grad:
            tape.save(tape.new(B * T, 8))  # token ids kept by the embedding
        if self.llama:
            x = tape.new(B * T * C, emb[0].b, emb[0].grad)
            if self.method == "prompt":
                x = tape.new(B * Tq * C, x.b, True)  # cat([prompt.to(dtype), embed_tokens(ids)])
            self.cos, self.sin = tape.new(Tq * self.hs, x.b), tape.new(Tq * self.hs, x.b)
            return x
        if self.gpt:
            if emb[1].grad:
                tape.save(tape.new(T, 8))  # positions
            tok = tape.new(B * T * C, emb[0].b, emb[0].grad)
            if self.method == "prompt":
                tok = tape.new(B * Tq * C, tok.b, True)  # cat([prompt.to(dtype), wte(ids)])
            return tape.dropout(tape.add(tok, tape.new(Tq * C, emb[1].b, emb[1].grad)), self.p)
        if emb[1].grad:
            tape.save(tape.new(Tq, 8), tape.new(B * Tq, 8))  # position and token-type ids
        x = tape.new(B * T * C, emb[0].b, emb[0].grad)
        if self.method == "prompt":
            x = tape.new(B * Tq * C, x.b, True)
        x = tape.add(tape.add(x, tape.new(Tq * C, emb[1].b, emb[1].grad)), tape.new(self.rows * C, emb[2].b, emb[2].grad))
        return tape.dropout(tape.layer_norm(x, emb[3], emb[4], C), self.p)

    def block(self, x: Tracked, blk: dict) -> Tracked:
        """GPT's pre-LayerNorm block, Llama's pre-RMSNorm one or BERT's post-LayerNorm one."""
        tape, ln, C = self.tape, self.tape.layer_norm, self.C
        if self.llama:
            x = tape.add(x, self.attention(tape.rms_norm(x, *blk["ln_1"], C), blk))
            return tape.add(x, self.mlp(tape.rms_norm(x, *blk["ln_2"], C), blk))
        if self.gpt:
            x = tape.add(x, tape.dropout(self.attention(ln(x, *blk["ln_1"], C), blk), self.p))
            return tape.add(x, tape.dropout(self.mlp(ln(x, *blk["ln_2"], C), blk), self.p))
        x = ln(tape.add(x, tape.dropout(self.attention(x, blk), self.p)), *blk["ln_1"], C)
        return ln(tape.add(x, tape.dropout(self.mlp(x, blk), self.p)), *blk["ln_2"], C)

    def attention(self, x: Tracked, blk: dict) -> Tracked:
        tape, B, S, A, KV = self.tape, self.B, self.S, self.A, self.KV
        x = tape.cast_once(x)  # one bf16 copy for q, k, v and their adapters (BERT's residual keeps x)
        q, k, v = (self.linear(x, blk[n]) for n in ("q_proj", "k_proj", "v_proj"))
        if self.llama:
            q, k = self.rope(q), self.rope(k)
        if self.method == "prefix":  # cat([prefix.to(k's dtype), k]): (B, nkv, P+T, hs), needs a gradient
            k, v = tape.new(B * S * KV, k.b, True), tape.new(B * S * KV, v.b, True)
        if KV != A:  # GQA's repeat_kv: each key/value head copied for its group of query heads
            k, v = tape.new(B * S * A, k.b, k.grad), tape.new(B * S * A, v.b, v.grad)
        if self.padded:  # cat([zeros, q]) in, (B, nh, P+T, hs) out, the last T rows taken (a copy for o_proj)
            out = tape.sdpa(tape.new(B * S * A, q.b, q.grad), k, v, None, B, self.H, S, A, self.p_attn)
            out = tape.new(B * self.Tq * A, out.b, out.grad)
        else:
            bias = tape.new(self.Tq * S, x.b) if self.lower_right else self.bias
            out = tape.sdpa(q, k, v, bias, B, self.H, self.Tq, A, self.p_attn)
        return self.linear(out, blk["o_proj"])

    def rope(self, t: Tracked) -> Tracked:
        """t * cos + rotate_half(t) * sin: the products keep the tables, not t."""
        if t.grad:
            self.tape.save(self.cos, self.sin)
        return self.tape.new(t.n, max(t.b, self.cos.b), t.grad)

    def mlp(self, x: Tracked, blk: dict) -> Tracked:
        tape, x = self.tape, self.tape.cast_once(x)
        if self.llama:  # SwiGLU: down(silu(gate(x)) * up(x))
            gate = tape.pointwise(self.linear(x, blk["gate_proj"]))
            return self.linear(tape.mul(gate, self.linear(x, blk["up_proj"])), blk["down_proj"])
        return self.linear(tape.pointwise(self.linear(x, blk["up_proj"])), blk["down_proj"])

    def linear(self, x: Tracked, li: Projection) -> Tracked:
        """A projection, plus its LoRA / DoRA / AdaLoRA update when it has one."""
        tape = self.tape
        if not li.kind:
            return tape.linear(x, li.w, li.b, li.fin, li.fout)
        if li.kind == "adalora":  # x @ (A * E)^T @ B^T: the product A*E is a small (r, in) tensor
            a, _, bw = li.adapter
            a = tape.new(a.n, 4, True)  # A * E keeps A and E (parameters: nothing new)
        else:
            a, bw = li.adapter[:2]
        r = a.n // li.fin
        lo = tape.linear(tape.linear(tape.dropout(x, li.dropout), a, None, li.fin, r), bw, None, r, li.fout)
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

    def lm_loss(self, x: Tracked) -> int:
        """GPT's fused cross-entropy on the final hidden states ``x``: what it keeps for backward
        goes on the tape; returns the bytes of its buffers inside the forward."""
        tape, C, V = self.tape, self.C, self.V
        act_b = 2 if tape.ac else 4
        wte = self.net.lm_head or self.net.emb[0]  # the head's matrix: tied (the token embedding) or not
        n_pos = self.B * (self.Tq - 1)
        Vp = -(-V // 64) * 64  # lm_loss pads the vocabulary to a multiple of 64
        head_grad = wte.grad and n_pos > 0  # with one position there is nothing to predict: a zero loss
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
        shifted = n_pos * C * act_b if self.B > 1 or tape.ac else 0
        head = Vp * C * (2 if tape.ac else 4) if n_pos and (Vp != V or (tape.ac and wte.b == 4)) else 0
        chunk = c * Vp * (6 if tape.ac else 4)
        head_chunk = Vp * C * (2 if tape.ac else 4) if head_grad else 0
        return shifted + head + chunk + head_chunk

    def classifier_loss(self, x: Tracked) -> int:
        """BertClassifier's pooler, dropout, head and cross-entropy; no buffers beyond what it keeps."""
        tape, B, C = self.tape, self.B, self.C
        pooler, head = self.net.pooler, self.net.head
        k = head.fout  # num_labels
        cls = tape.new(B * C, x.b, x.grad)  # x[:, 0]
        pooled = tape.pointwise(tape.linear(cls, pooler.w, pooler.b, C, C), save_input=False)
        if not tape.ac and tape.saved.pop(id(cls), None):  # fp32: the kept input is a view of x
            tape.save(x)
        out = tape.linear(tape.dropout(pooled, self.p), head.w, head.b, C, k)
        if out.grad:
            # log-softmax, labels, weight; the count of labels the summed loss is divided by (int64)
            tape.save(tape.new(B * k, 4), tape.new(B, 8), tape.new(1, 4), tape.new(1, 8))
        return 0

    def orth_penalty(self) -> None:
        """AdaLoRA's orthogonality penalty: A A^T and B^T B over stacked copies of A and B."""
        tape, adapters = self.tape, self.net.adapters()
        tape.save(*(tape.bf16(tape.new(p.n, 4, True)) for ad in adapters for p in (ad[0], ad[2])))
        tape.save(*(tape.new(ad[1].n ** 2, 4) for ad in adapters for _ in "AB"))  # (. - I) ** 2 keeps its input
