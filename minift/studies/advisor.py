"""Method advisor: will it fit on my GPU, and which fine-tuning method suits my task?

Two answers, side by side:
- the **rule tables** people start from (``rule_by_resources``, ``rule_by_task``,
  ``SUMMARY_RULES``), reproduced exactly as named baseline rules;
- a **grounded answer**: ``minift.studies.memory.estimate_memory`` for every method, keeping those
  that fit (the training step it models is described in ``minift.studies.memory``).

GPU sizes given to ``recommend`` are GiB (2**30 bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# the estimator's names stay importable from here (minift.studies.advisor.estimate_memory, ...)
from minift.studies.memory import (CUBLAS_WORKSPACE, LLAMA_PROJ, PROJ,  # noqa: F401
                           GiB, MemoryEstimate, MethodOptions, estimate_memory, refusal)
from minift.studies.memory_ranks import check_ranks, estimate_per_rank
from minift.studies.presets import PRESETS, preset  # noqa: F401  (the model shapes: --preset)
from minift.methods.registry import METHODS  # noqa: F401
from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.models.llama import LlamaConfig

TASKS = ("classification", "generation", "qa", "code", "other")
LEVELS = ("low", "medium", "high")


# ============================================================================ model shapes

def config_from_dir(path) -> GPTConfig | BertConfig:
    """The config of an HF-format model directory (GPT-2 or BERT ``config.json``)."""
    from minift.models import bert, gpt, hf
    raw = hf.read_config(path)
    kind = raw.get("model_type")
    try:
        if kind == "gpt2":
            return gpt.config_from_hf(raw)
        if kind == "bert":
            return bert.config_from_hf(raw)
    except KeyError as e:
        key = e.args[0] if e.args else "?"
        raise ValueError(f"{path}/config.json has no {key!r} key (needed for a {kind} model)") from None
    raise ValueError(f"{path}/config.json has model_type {kind!r}; the advisor reads 'gpt2' and 'bert'")


# ============================================================================ rule tables

# rule-table name -> minift method
RULE_METHODS = {"full_parameter": "full", "lora": "lora", "prefix_tuning": "prefix",
                "layer_wise_freezing": "freeze", "adalora": "adalora", "probing": "probe"}

SUMMARY_RULES = (  # (situation, rule-table methods)
    ("ample resources", ("full_parameter",)),
    ("limited resources", ("lora", "prefix_tuning")),
    ("many tasks", ("adalora",)),
    ("analysis", ("probing",)),
    ("balance of cost and quality", ("layer_wise_freezing",)),
)


@dataclass
class RuleAnswer:
    rule: str  # which named rule fired, e.g. "by_resources: 8 <= GPU < 16 GB, data size < 1000"
    method: str  # the rule-table name, e.g. "layer_wise_freezing"
    assumption: str = ""  # what was assumed when an input was not given


def _check_level(name: str, v: str) -> None:
    if v not in LEVELS:
        raise ValueError(f"{name} must be one of {', '.join(LEVELS)}; got {v!r}")


def rule_by_resources(gpu_mem_gb: float, complexity: str = "medium", data_size: int | None = None) -> RuleAnswer:
    """The resource table. Boundaries: exactly 8 GB is in the 8-16 row, exactly 16 in the
    16-32 row, exactly 32 in the >= 32 row; data size exactly 1000 is not "< 1000".
    - GPU < 8 GB: ``lora`` when complexity is low, else ``prefix_tuning``;
    - 8 <= GPU < 16: ``lora`` when data size < 1000, else ``layer_wise_freezing``
      (an unknown data size is taken as >= 1000, and said so);
    - 16 <= GPU < 32: ``full_parameter`` when complexity is high, else ``lora``;
    - GPU >= 32: ``full_parameter``."""
    _check_level("complexity", complexity)
    if not isinstance(gpu_mem_gb, (int, float)) or not math.isfinite(gpu_mem_gb) or gpu_mem_gb <= 0:
        raise ValueError(f"GPU memory must be a positive number of GB, got {gpu_mem_gb!r}")
    if data_size is not None and data_size < 0:
        raise ValueError(f"data size must be >= 0 examples, got {data_size}")
    if gpu_mem_gb < 8:
        return RuleAnswer(f"by_resources: GPU < 8 GB, complexity {'low' if complexity == 'low' else 'not low'}",
                          "lora" if complexity == "low" else "prefix_tuning")
    if gpu_mem_gb < 16:
        small = data_size is not None and data_size < 1000
        return RuleAnswer(f"by_resources: 8 <= GPU < 16 GB, data size {'< 1000' if small else '>= 1000'}",
                          "lora" if small else "layer_wise_freezing",
                          "" if data_size is not None else "data size not given: taken as >= 1000")
    if gpu_mem_gb < 32:
        return RuleAnswer(f"by_resources: 16 <= GPU < 32 GB, complexity {'high' if complexity == 'high' else 'not high'}",
                          "full_parameter" if complexity == "high" else "lora")
    return RuleAnswer("by_resources: GPU >= 32 GB", "full_parameter")


def rule_by_task(task: str, similarity: float | None = None, data_quality: str = "medium") -> RuleAnswer:
    """The task table. Boundary: similarity exactly 0.8 is not "> 0.8" (gives ``lora``).
    - classification: ``layer_wise_freezing`` when domain similarity > 0.8, else ``lora``
      (an unknown similarity gives ``lora``, and says so);
    - generation: ``full_parameter`` when data quality is high, else ``prefix_tuning``;
    - qa: ``lora``; code: ``adalora``; anything else: ``lora``."""
    _check_level("data quality", data_quality)
    if similarity is not None and not (isinstance(similarity, (int, float)) and 0.0 <= similarity <= 1.0):
        raise ValueError(f"similarity must be in [0, 1], got {similarity!r}")
    if task == "classification":
        high = similarity is not None and similarity > 0.8
        return RuleAnswer(f"by_task: classification, similarity {'> 0.8' if high else '<= 0.8'}",
                          "layer_wise_freezing" if high else "lora",
                          "" if similarity is not None else "similarity not given: taken as <= 0.8")
    if task == "generation":
        return RuleAnswer(f"by_task: generation, data quality {'high' if data_quality == 'high' else 'not high'}",
                          "full_parameter" if data_quality == "high" else "prefix_tuning")
    if task == "qa":
        return RuleAnswer("by_task: question answering", "lora")
    if task == "code":
        return RuleAnswer("by_task: code generation", "adalora")
    return RuleAnswer(f"by_task: other task ({task})", "lora")


# ============================================================================ recommend

@dataclass
class Candidate:
    method: str
    peak_bytes: int
    trainable_params: int
    fits: bool
    why: str = ""


@dataclass
class Recommendation:
    by_resources: RuleAnswer
    by_task: RuleAnswer
    rules_method: str  # the minift method the rule tables point to (task rule first)
    grounded: list[Candidate]  # methods that fit, ranked
    rejected: list[Candidate]  # methods that do not fit
    summary: str
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


# Capacity order used to rank the methods that fit, after the rule tables' own picks:
# more of the model adapted first (quality), ties keep this order.
CAPACITY = ("full", "freeze", "dora", "lora", "adalora", "prefix", "prompt", "bitfit")


def recommend(config: GPTConfig | BertConfig | LlamaConfig, gpu_mem_gb: float, batch: int, seq_len: int,
              task: str = "other",
              complexity: str = "medium", data_size: int | None = None, similarity: float | None = None,
              data_quality: str = "medium", *, dtype: str = "bf16", frozen_dtype: str = "bf16",
              headroom: float = 0.1, nproc: int = 1, shard: bool = False, **method_options) -> Recommendation:
    """The rule tables' answer, then every method whose estimated peak fits in
    ``gpu_mem_gb`` GiB less ``headroom`` (CUDA context, fragmentation), ranked: the rule
    tables' picks first (task rule, then resource rule) when they fit, then by capacity. A method
    the model refuses (BitFit on a Llama without biases) is left out, and the summary says why.

    ``nproc`` > 1: the peak of one rank of ``nproc`` GPUs (``minift.studies.memory_ranks``), ``batch``
    being the global batch; with ``shard``, full fine-tuning is FSDP2-sharded and every other method
    data parallel (as ``minift train --shard`` takes full fine-tuning only). ``gpu_mem_gb`` is then
    each GPU's memory."""
    if not isinstance(gpu_mem_gb, (int, float)) or not math.isfinite(gpu_mem_gb) or gpu_mem_gb <= 0:
        raise ValueError(f"GPU memory must be a positive number of GB, got {gpu_mem_gb!r}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    check_ranks("full", batch, nproc, shard)
    res = rule_by_resources(gpu_mem_gb, complexity, data_size)
    tsk = rule_by_task(task, similarity, data_quality)
    budget = gpu_mem_gb * GiB * (1 - headroom)
    cands, refused = [], []
    for m in CAPACITY:
        if refusal(config, m) is not None:
            refused.append(f"{m} left out: {refusal(config, m)}")
            continue
        e = estimate_per_rank(config, m, batch, seq_len, dtype, frozen_dtype=frozen_dtype, nproc=nproc,
                              shard=shard and m == "full", **method_options)
        cands.append(Candidate(m, e.peak, e.trainable_params, e.peak <= budget))
    picks = [RULE_METHODS[tsk.method], RULE_METHODS[res.method]]
    order = {m: (picks.index(m) if m in picks else len(picks), CAPACITY.index(m)) for m in CAPACITY}
    fit = sorted((c for c in cands if c.fits), key=lambda c: order[c.method])
    rejected = [c for c in cands if not c.fits]
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    per = " per rank" if nproc > 1 else ""
    for c in cands:
        what = f"estimated peak{per} {gib(c.peak_bytes)} {'<=' if c.fits else '>'} {gib(budget)} usable"
        tags = [f"the {r.rule.split(':')[0]} rule's pick" for r in (tsk, res) if RULE_METHODS[r.method] == c.method]
        c.why = f"{what}; {c.trainable_params:,} trainable" + (f"; {' and '.join(tags)}" if tags else "")
    rules_method = picks[0]
    notes = list(refused)
    for r in (tsk, res):
        m = RULE_METHODS[r.method]
        c = next(x for x in cands if x.method == m)
        if not c.fits:
            notes.append(f"the rule table's {r.method} ({r.rule}) does not fit: {c.why}")
        if r.assumption:
            notes.append(r.assumption)
    if picks[0] != picks[1]:
        notes.append(f"the two rule tables disagree ({tsk.method} by task, {res.method} by resources)")
    full_fit = next(c for c in cands if c.method == "full")
    if full_fit.fits and "full" not in picks:
        notes.append(f"the grounded answer goes further than the rule tables: full fine-tuning also fits "
                     f"({gib(full_fit.peak_bytes)})")
    if fit and fit[0].method not in picks:
        notes.append(f"neither rule pick fits; the largest method that does is {fit[0].method}")
    if not fit:
        notes.append(f"nothing fits in {gpu_mem_gb} GB at batch {batch} x {seq_len}: lower the batch or the "
                     f"sequence length")
    best = fit[0].method if fit else "none"
    on = (f" on {nproc} GPUs ({'full fine-tuning sharded, the others ' if shard else ''}data parallel, "
          f"{batch // nproc} rows per rank)" if nproc > 1 else "")
    summary = (f"rules: {tsk.method} (by task) / {res.method} (by resources); grounded: {best} at batch {batch} x "
               f"{seq_len}{on}" + ("; " + "; ".join(notes) if notes else ""))
    inputs = dict(gpu_mem_gb=gpu_mem_gb, batch=batch, seq_len=seq_len, task=task, complexity=complexity,
                  data_size=data_size, similarity=similarity, data_quality=data_quality, dtype=dtype,
                  frozen_dtype=frozen_dtype, headroom=headroom, nproc=nproc, shard=shard)
    return Recommendation(res, tsk, rules_method, fit, rejected, summary, inputs)


def format_recommendation(rec: Recommendation) -> str:
    n = rec.inputs.get("nproc", 1)
    per = f" per rank of {n} GPUs" if n > 1 else ""
    lines = [f"rule table, by resources: {rec.by_resources.method}  [{rec.by_resources.rule}]",
             f"rule table, by task:      {rec.by_task.method}  [{rec.by_task.rule}]",
             "summary table: " + "; ".join(f"{s} -> {' or '.join(m)}" for s, m in SUMMARY_RULES),
             "", f"grounded (estimated peak of one training step{per}; fits, ranked):"]
    lines += [f"  {i + 1}. {c.method:<8} {c.peak_bytes / GiB:7.2f} GiB  {c.trainable_params:>13,} trainable  ({c.why})"
              for i, c in enumerate(rec.grounded)] or ["  (none)"]
    if rec.rejected:
        lines.append("does not fit: " + ", ".join(f"{c.method} ({c.peak_bytes / GiB:.1f} GiB)" for c in rec.rejected))
    return "\n".join(lines + ["", rec.summary])
