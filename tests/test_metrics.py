"""Metrics against their references: scikit-learn and Google's rouge-score (use_stemmer=False)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift import metrics

sk = pytest.importorskip("sklearn.metrics")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rougeL"], use_stemmer=False)

labels = st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from("abcde"), min_size=n, max_size=n),
    st.lists(st.sampled_from("abcdef"), min_size=n, max_size=n)))  # 'f' only ever predicted


@settings(max_examples=25, deadline=None)
@given(labels)
def test_classification_matches_sklearn(yy):
    y_true, y_pred = yy
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=1e-9)
    for avg in ("macro", "weighted"):
        ref = sk.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)[:3]
        got = metrics.precision_recall_f1(y_true, y_pred, avg)
        assert got == pytest.approx(ref, abs=1e-9), avg


def test_classification_by_hand():
    # class 0: tp 1, 3 predicted, 2 true -> P 1/3, R 1/2, F1 2/5; class 1: tp 1, 2, 2 -> 1/2, 1/2, 1/2;
    # class 2: tp 0, 0 predicted, 1 true -> 0, 0, 0
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 0, 0]
    assert metrics.precision_recall_f1(y_true, y_pred, "macro") == pytest.approx((5 / 18, 1 / 3, 0.3))
    assert metrics.precision_recall_f1(y_true, y_pred, "weighted") == pytest.approx(
        ((2 / 3 + 1) / 5, (1 + 1) / 5, (0.8 + 1) / 5))
    m = metrics.classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert set(m) == {"accuracy", "macro_precision", "macro_recall", "macro_f1",
                      "weighted_precision", "weighted_recall", "weighted_f1"}
    assert metrics.precision_recall_f1([1, 1], [1, 1], "weighted") == (1.0, 1.0, 1.0)


def test_classification_bad_input():
    with pytest.raises(ValueError, match="average 'micro' is unknown"):
        metrics.precision_recall_f1([1], [1], "micro")
    with pytest.raises(ValueError, match="y_true has 2 labels, y_pred has 1"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])


# words from a small vocabulary (so n-grams overlap), with case, punctuation, digits and non-ASCII
word = st.sampled_from(["the", "The", "cat", "CAT", "sat", "on", "mat", "a", "dog's", "x-ray", "42",
                        "naïve", "café", "über", "!!", "...", "e.g.", "",
                        "\u212a"])  # KELVIN SIGN: str.lower() makes it an ASCII k
text = st.lists(word, max_size=30).map(" ".join) | st.text(max_size=40)


@settings(max_examples=25, deadline=None)
@given(text, text)
def test_rouge_matches_rouge_score(pred, ref):
    ref_scores = SCORER.score(ref, pred)  # rouge-score takes (target, prediction)
    for n in (1, 2, 3):
        assert metrics.rouge_n(pred, ref, n) == pytest.approx(ref_scores[f"rouge{n}"].fmeasure, abs=1e-9)
    assert metrics.rouge_l(pred, ref) == pytest.approx(ref_scores["rougeL"].fmeasure, abs=1e-9)


def test_rouge_by_hand():
    pred, ref = "The cat sat on the mat.", "the cat is on the mat"
    # unigrams: overlap the, cat, on, the, mat = 5 of 6 and 6 -> F = 5/6
    assert metrics.rouge_n(pred, ref, 1) == pytest.approx(5 / 6)
    # bigrams: (the cat), (on the), (the mat) overlap = 3 of 5 each -> 3/5
    assert metrics.rouge_n(pred, ref, 2) == pytest.approx(3 / 5)
    assert metrics.rouge_l(pred, ref) == pytest.approx(5 / 6)  # LCS: the cat on the mat
    assert metrics.rouge_l("", ref) == 0.0 and metrics.rouge_n("!!", "!!", 1) == 0.0
    assert metrics.rouge_tokens("Don't STOP-me now!") == ["don", "t", "stop", "me", "now"]
    agg = metrics.rouge([pred, ref], [ref, ref])
    assert agg["rouge1"] == pytest.approx((5 / 6 + 1) / 2) and agg["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    with pytest.raises(ValueError, match="n >= 1"):
        metrics.rouge_n(pred, ref, 0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=25), st.lists(st.integers(0, 5), max_size=25))
def test_lcs_matches_full_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    assert metrics.lcs_length(a, b) == table[-1][-1]


def test_perplexity():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(50257)) == pytest.approx(50257)
    assert metrics.perplexity(1e4) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        metrics.perplexity(float("nan"))


def test_t_quantile_matches_scipy():
    from scipy import stats

    from minift.metrics import t_quantile
    for df in (1, 2, 3, 5, 10, 30, 120):
        for p in (0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 0.025):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-12)


def test_mean_interval_by_hand():
    from minift.metrics import mean_interval
    mean, half = mean_interval([0.80, 0.90, 0.85])
    # s = 0.05, t(0.975, 2) = 4.302652729749464: 4.302652729749464 * 0.05 / sqrt(3)
    assert mean == pytest.approx(0.85) and half == pytest.approx(0.1242068, abs=1e-7)
    assert mean_interval([0.7]) == (0.7, None)
    with pytest.raises(ValueError):
        mean_interval([])
