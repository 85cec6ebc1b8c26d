"""Evaluation metrics in plain Python: accuracy, precision/recall/F1, ROUGE, perplexity.

Classification (labels: any hashable values; the classes are those in y_true or y_pred):

    precision_c = tp_c / (tp_c + fp_c)    recall_c = tp_c / (tp_c + fn_c)
    F1_c        = 2 tp_c / (2 tp_c + fp_c + fn_c)          (0 where a denominator is 0)
    macro       = mean over classes       weighted = sum_c support_c * metric_c / sum_c support_c

as scikit-learn's ``precision_recall_fscore_support`` (``zero_division=0``). ROUGE-N and
ROUGE-L are F-measures as Google's ``rouge-score`` computes them with ``use_stemmer=False``:
lowercase, every run of characters outside [a-z0-9] becomes a space, split on whitespace;

    ROUGE-N: overlap = sum over n-grams g of min(count_ref(g), count_pred(g))
             P = overlap / #pred n-grams, R = overlap / #ref n-grams
    ROUGE-L: P = LCS / #pred tokens,  R = LCS / #ref tokens        F = 2PR / (P + R)
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

AVERAGES = ("macro", "weighted")


def _check_pair(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels, y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no labels to score (y_true is empty)")


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def precision_recall_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                        average: str = "macro") -> tuple[float, float, float]:
    """(precision, recall, F1) averaged over classes, ``average`` = "macro" or "weighted"."""
    if average not in AVERAGES:
        raise ValueError(f"average {average!r} is unknown; choose one of {', '.join(AVERAGES)}")
    _check_pair(y_true, y_pred)
    tp, n_pred, n_true = Counter(), Counter(y_pred), Counter(y_true)
    for t, p in zip(y_true, y_pred):
        tp[t] += t == p
    classes = set(n_true) | set(n_pred)
    weight = {c: 1.0 if average == "macro" else n_true[c] for c in classes}
    total = sum(weight.values())
    prec = sum(weight[c] * (tp[c] / n_pred[c] if n_pred[c] else 0.0) for c in classes) / total
    rec = sum(weight[c] * (tp[c] / n_true[c] if n_true[c] else 0.0) for c in classes) / total
    f1 = sum(weight[c] * (2 * tp[c] / (n_true[c] + n_pred[c])) for c in classes) / total  # 2tp + fp + fn
    return prec, rec, f1


def classification_metrics(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> dict[str, float]:
    """accuracy and macro/weighted precision, recall and F1, for a metrics log."""
    out = {"accuracy": accuracy(y_true, y_pred)}
    for avg in AVERAGES:
        p, r, f = precision_recall_f1(y_true, y_pred, avg)
        out.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    return out


# ---------------------------------------------------------------------------- ROUGE

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lowercase, non-[a-z0-9] runs -> spaces, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_n(pred: str, ref: str, n: int = 1) -> float:
    """ROUGE-N F-measure of a prediction against one reference."""
    if n < 1:
        raise ValueError(f"ROUGE-N needs n >= 1, got {n}")
    def grams(toks):
        return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    gp, gr = grams(rouge_tokens(pred)), grams(rouge_tokens(ref))
    overlap = sum(min(c, gp[g]) for g, c in gr.items())
    return _f(overlap, sum(gp.values()), sum(gr.values()))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (sentence-level LCS, rouge-score's "rougeL") of a prediction against one reference."""
    tp, tr = rouge_tokens(pred), rouge_tokens(ref)
    if not tp or not tr:
        return 0.0
    return _f(lcs_length(tr, tp), len(tp), len(tr))


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures over prediction/reference pairs."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need as many predictions as references, at least one; got {len(preds)} and {len(refs)}")
    n = len(preds)
    return {"rouge1": sum(map(rouge_n, preds, refs, [1] * n)) / n,
            "rouge2": sum(map(rouge_n, preds, refs, [2] * n)) / n,
            "rougeL": sum(map(rouge_l, preds, refs)) / n}


# ---------------------------------------------------------------------------- language modelling

def perplexity(mean_loss: float) -> float:
    """exp(mean per-token cross-entropy in nats); inf where that overflows."""
    if math.isnan(mean_loss):
        raise ValueError("mean_loss is NaN")
    return math.exp(mean_loss) if mean_loss < 709.0 else math.inf


# ---------------------------------------------------------------------------- intervals over seeds

def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with ``df`` degrees of freedom (0 < p < 1).

    Found by bisection on the CDF, which is written with the regularized incomplete beta function:
    for t >= 0, P(T <= t) = 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2).
    """
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0."""
    return 1.0 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the ``level`` confidence interval of the mean) of independent runs:
    t_{(1+level)/2, n-1} * s / sqrt(n), with s the sample standard deviation. The half-width is
    None for a single value (no spread to estimate)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile((1 + level) / 2, n - 1) * s / math.sqrt(n)
