"""The memory estimator's symbolic forward: a tape that records, op by op, the bytes autograd
saves for backward, without running anything (``minift.studies.memory`` drives it through a model).

Each op mirrors PyTorch's autograd and autocast rules: a matmul keeps its (bf16) input when its
weight trains and its (bf16) weight when its input needs a gradient; LayerNorm keeps its fp32
input, mean and rstd; GELU its input; SDPA q, k, v, out and logsumexp (+ the bias), its
attention dropout fused into the kernel, which keeps only its RNG state (a few bytes, not
counted); dropout with p > 0 its mask (bool on CUDA). Views share storage and are counted once
(the caller saves the tensor a view is of). On CPU (``cuda=False``, no autocast) the same rules
hold except that dropout masks have the input's dtype and SDPA with attention dropout runs its
math form, which keeps T x S tensors (``Tape.sdpa`` lists them); the tests check that form
against ``torch.autograd.graph.saved_tensors_hooks`` byte for byte.
"""
from __future__ import annotations


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
