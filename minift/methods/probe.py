"""Probing: what does each layer of a frozen model already know?

A linear probe (Alain & Bengio 2016) reads one layer's features h_ℓ(x) of the frozen model:

    ŷ = argmax_k (W_ℓ h_ℓ(x) + b_ℓ)_k          only W_ℓ, b_ℓ are trained (logistic regression)

Control task (Hewitt & Liang 2019): the same inputs with labels assigned at random per word
type (token tasks) or per example. A probe that does well on the control task is memorizing,
not reading the representation, so report

    selectivity_ℓ = accuracy_ℓ(task) - accuracy_ℓ(control)

    tokens ─► embeddings ─► block 0 ─► block 1 ─► ... ─► block L-1   (frozen, no_grad, run once)
                  │ h_0         │ h_1       │ h_2              │ h_L
                  ▼             ▼           ▼                  ▼
               probe_0       probe_1     probe_2     ...    probe_L    (one linear layer each)

Hidden state 0 is the embeddings' output and h_ℓ the output of block ℓ-1 (for GPT and Llama
the last one is after the final norm). Pooling: ``cls`` the first token ([CLS] for BERT),
``last`` the last real token (the analogue for GPT and Llama, which read left to right),
``mean`` the mean over real tokens, ``token`` every labelled token (token tasks: labels
(B, T), -100 where none).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.metrics import accuracy, precision_recall_f1
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.llama import Llama

POOLINGS = ("cls", "mean", "last", "token")


# ---------------------------------------------------------------------------- features

def _encoder(model: nn.Module) -> nn.Module:
    if isinstance(model, BertClassifier):
        return model.bert
    if isinstance(model, (GPT, Llama, Bert)):
        return model
    raise ValueError(f"probing works on GPT, Llama, Bert and BertClassifier models, got {type(model).__name__}")


def _check_layers(layers, n_hidden: int) -> list[int]:
    if layers is None:
        return list(range(n_hidden))
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one hidden state to probe")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_hidden:
            raise ValueError(f"layer {i!r} does not exist: the model has hidden states 0..{n_hidden - 1} "
                             f"(0 = embeddings, {n_hidden - 1} = last block)")
    return layers


def _token_mask(batch: dict) -> torch.Tensor:
    """(B, T) bool: real tokens that carry a label (token pooling keeps exactly these)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        keep = keep & (labels != -100)
    return keep


def extract_features(model: nn.Module, batches, pooling: str = "cls", layers=None) -> list[torch.Tensor]:
    """Run the frozen model once over ``batches`` (no_grad) and return one fp32 CPU tensor per
    probed hidden state (all of them by default, 0 = embeddings): (N, C) pooled, or
    (N_tokens, C) with ``pooling="token"``. The model's train/eval mode is restored."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    enc = _encoder(model)
    layers = _check_layers(layers, len(enc.layers) + 1)
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = batch["input_ids"], batch.get("attention_mask")
                if isinstance(enc, (GPT, Llama)):  # causal LMs: no token types, no logits needed
                    hs = enc(ids, attention_mask=mask, output_hidden_states=True, compute_logits=False).hidden_states
                else:
                    hs = enc(ids, mask, batch.get("token_type_ids"), output_hidden_states=True).hidden_states
                m = torch.ones_like(ids) if mask is None else mask
                for slot, i in enumerate(layers):
                    h = hs[i]  # (B, T, C)
                    if pooling == "cls":
                        f = h[:, 0]
                    elif pooling == "mean":
                        w = m.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
                        f = (h * w).sum(1) / w.sum(1).clamp(min=1)
                    elif pooling == "last":  # the last position whose mask is 1, for either padding side
                        pos = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(1)  # (B,)
                        f = h[torch.arange(h.shape[0], device=h.device), pos]
                    else:
                        f = h[_token_mask(batch)]  # (N_tokens, C)
                    out[slot].append(f.float().cpu())
    finally:
        model.train(was_training)
    if not out[0]:
        raise ValueError("batches is empty: nothing to probe")
    return [torch.cat(fs, dim=0) for fs in out]


def batch_labels(batches, pooling: str = "cls") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(labels, types, groups) aligned with ``extract_features``' rows: ``types`` are the
    token ids (token pooling only, for the per-word-type control task) and ``groups`` the
    example each row comes from (the train/test split never cuts an example)."""
    labels, types, groups, n = [], [], [], 0
    for batch in batches:
        y = batch.get("labels")
        if y is None:
            raise ValueError("each batch needs 'labels' to probe")
        B = batch["input_ids"].shape[0]
        if pooling == "token":
            if y.dim() != 2:
                raise ValueError(f"pooling='token' needs labels of shape (B, T), got {tuple(y.shape)}")
            keep = _token_mask(batch)  # (B, T)
            labels.append(y[keep])
            types.append(batch["input_ids"][keep])
            groups.append((torch.arange(B)[:, None] + n).expand_as(keep)[keep])
        else:
            if y.dim() != 1:
                raise ValueError(f"pooling={pooling!r} needs one label per example (B,), got {tuple(y.shape)}")
            labels.append(y)
            groups.append(torch.arange(n, n + B))
        n += B
    return (torch.cat(labels).long().cpu(), torch.cat(types).cpu() if types else None,
            torch.cat(groups))


# ---------------------------------------------------------------------------- control task

def control_labels(labels: torch.Tensor, types: torch.Tensor | None = None, *, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang control labels for the same rows.

    With ``types`` (token ids, token tasks) every distinct type gets one label drawn from the
    empirical label distribution and keeps it wherever it occurs. Without, labels are
    assigned at random per example: a random permutation of ``labels`` (same class balance).
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels.long().cpu()
    if types is None:
        return labels[torch.randperm(len(labels), generator=g)]
    if types.shape != labels.shape:
        raise ValueError(f"types {tuple(types.shape)} and labels {tuple(labels.shape)} must match")
    uniq, inverse = torch.unique(types.cpu(), return_inverse=True)
    per_type = labels[torch.randint(len(labels), (len(uniq),), generator=g)]  # empirical distribution
    return per_type[inverse]


# ---------------------------------------------------------------------------- probes

def split(groups: torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, test), holding out a random ``test_fraction`` of the groups (examples)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    uniq = torch.unique(groups)
    n_test = max(1, round(test_fraction * len(uniq)))
    if n_test >= len(uniq):
        raise ValueError(f"need at least 2 examples to split into train and test, got {len(uniq)}")
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    is_test = torch.isin(groups, perm[:n_test])
    return (~is_test).nonzero().squeeze(1), is_test.nonzero().squeeze(1)


class LinearProbe(nn.Module):
    """Standardize with training statistics, then one linear layer: logits = W (x - μ)/σ + b."""

    def __init__(self, x: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp(min=1e-6))
        self.linear = nn.Linear(x.shape[1], num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear((x - self.mean) / self.std)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = 1e-3,
              max_iter: int = 100) -> LinearProbe:
    """Multinomial logistic regression, full batch with L-BFGS:
    minimize mean CE + l2 * ||W||² (deterministic: zero init, no sampling)."""
    probe = LinearProbe(x, num_classes)
    z = (x - probe.mean) / probe.std  # standardized once, not at every evaluation
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe.linear(z), y) + l2 * probe.linear.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return probe


def train_probes(features: list[torch.Tensor], labels: torch.Tensor, *, groups: torch.Tensor | None = None,
                 test_fraction: float = 0.2, num_classes: int | None = None, l2: float = 1e-3,
                 max_iter: int = 100, seed: int = 0) -> list[dict]:
    """One probe per feature tensor, trained on the same held-out split; returns per layer
    ``{"accuracy", "f1"}`` (macro-F1) on the test rows."""
    labels = labels.long().cpu()
    for i, f in enumerate(features):
        if f.dim() != 2 or f.shape[0] != len(labels):
            raise ValueError(f"features[{i}] has shape {tuple(f.shape)}, expected ({len(labels)}, C)")
    k = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in [0, {k - 1}], got {labels.min().item()}..{labels.max().item()}")
    tr, te = split(torch.arange(len(labels)) if groups is None else groups, test_fraction, seed)
    rows = []
    for f in features:
        f = f.float()
        probe = fit_probe(f[tr], labels[tr], k, l2=l2, max_iter=max_iter)
        with torch.no_grad():
            pred = probe(f[te]).argmax(-1)
        gold, pred = labels[te].tolist(), pred.tolist()
        rows.append({"accuracy": accuracy(gold, pred), "f1": precision_recall_f1(gold, pred, "macro")[2]})
    return rows


# ---------------------------------------------------------------------------- results

@dataclass
class ProbeResult:
    pooling: str
    num_classes: int
    n_train: int
    n_test: int
    chance: float  # share of the test split's most frequent class
    rows: list[dict]  # per layer: layer, accuracy, f1, control_accuracy, selectivity
    meta: dict = field(default_factory=dict)

    def to_json(self, path=None) -> str:
        text = json.dumps(asdict(self), indent=2)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        head = "| layer | accuracy | macro-F1 | control acc. | selectivity |\n| ---: | ---: | ---: | ---: | ---: |\n"
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
        body = "".join(f"| {r['layer']} | {fmt(r['accuracy'])} | {fmt(r['f1'])} | "
                       f"{fmt(r['control_accuracy'])} | {fmt(r['selectivity'])} |\n" for r in self.rows)
        return (head + body + f"\nPooling `{self.pooling}`, {self.num_classes} classes, {self.n_train} train / "
                f"{self.n_test} test rows; majority-class accuracy {100 * self.chance:.1f}%. Values in %.\n")

    def plot(self, path) -> str:
        """Write a PNG of accuracy, control accuracy and selectivity against layer (needs matplotlib)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install 'minift[plot]'") from None
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        xs = [r["layer"] for r in self.rows]
        for key, label in (("accuracy", "task accuracy"), ("control_accuracy", "control accuracy"),
                           ("selectivity", "selectivity")):
            ys = [r[key] for r in self.rows]
            if all(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(self.chance, color="gray", linestyle=":", label="majority class")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("fraction")
        ax.set_xticks(xs)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return str(path)


def probe_features(features: list[torch.Tensor], labels: torch.Tensor, *, layers=None, types=None,
                   groups=None, control: bool = True, pooling: str = "features", test_fraction: float = 0.2,
                   l2: float = 1e-3, max_iter: int = 100, seed: int = 0, meta: dict | None = None) -> ProbeResult:
    """Probe precomputed features (one tensor per layer) for the task and its control task."""
    layers = list(range(len(features))) if layers is None else list(layers)
    if len(layers) != len(features):
        raise ValueError(f"{len(layers)} layer indices for {len(features)} feature tensors")
    labels = labels.long().cpu()
    k = int(labels.max()) + 1
    kw = dict(groups=groups, test_fraction=test_fraction, num_classes=k, l2=l2, max_iter=max_iter, seed=seed)
    task = train_probes(features, labels, **kw)
    ctrl = train_probes(features, control_labels(labels, types, seed=seed), **kw) if control else None
    tr, te = split(torch.arange(len(labels)) if groups is None else groups, test_fraction, seed)
    rows = []
    for j, (i, t) in enumerate(zip(layers, task)):
        c = ctrl[j]["accuracy"] if ctrl else None
        rows.append({"layer": i, "accuracy": t["accuracy"], "f1": t["f1"], "control_accuracy": c,
                     "selectivity": None if c is None else t["accuracy"] - c})
    chance = torch.bincount(labels[te], minlength=k).max().item() / len(te)
    return ProbeResult(pooling, k, len(tr), len(te), chance, rows, dict(meta or {}))


def run_probe(model: nn.Module, batches, *, pooling: str = "cls", layers=None, control: bool = True,
              test_fraction: float = 0.2, l2: float = 1e-3, max_iter: int = 100, seed: int = 0,
              meta: dict | None = None) -> ProbeResult:
    """Extract every (or each listed) layer's features once, then probe them.

    ``batches`` follow the batch convention (``input_ids``, ``attention_mask``, ``labels``:
    (B,) class ids, or (B, T) with -100 for ``pooling="token"``); they are read twice.
    """
    batches = list(batches)
    feats = extract_features(model, batches, pooling, layers)
    labels, types, groups = batch_labels(batches, pooling)
    layers = _check_layers(layers, len(_encoder(model).layers) + 1)
    return probe_features(feats, labels, layers=layers, types=types, groups=groups, control=control,
                          pooling=pooling, test_fraction=test_fraction, l2=l2, max_iter=max_iter,
                          seed=seed, meta=meta)
