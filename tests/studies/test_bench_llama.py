"""Llama in the studies: the presets' shapes, `minift bench` with every method on a tiny Llama
(BitFit skipped, the bias-free model refuses it), the MFU count of its matmuls, the memory
estimate against what PyTorch really holds on CPU (parameters, gradients, AdamW state, tensors
saved for backward, byte for byte), the advisor, and the PEFT peer's script on the same shapes."""
import json
from dataclasses import replace

import pytest
import torch

from minift.cli import main
from minift.fast import loss as fast_loss
from minift.methods import adalora, freeze, full, lora, prefix, prompt
from minift.methods.common import count_trainable
from minift.models.llama import Llama, LlamaConfig
from minift.studies import advisor as A
from minift.studies import bench
from minift.training.forward import model_forward
from conftest import benchmark_script, saved_bytes

P = 5  # virtual tokens in the estimate's tests
SEVEN = A.LLAMA_PROJ
TINY = dict(vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, n_inner=48, max_position_embeddings=64)
OPTS = {"lora": dict(r=4, targets=SEVEN), "dora": dict(r=4, targets=SEVEN),
        "adalora": dict(init_r=6, targets=SEVEN, orth_penalty=False), "prefix": dict(num_virtual_tokens=P),
        "prompt": dict(num_virtual_tokens=P)}
TRAINED = ("full", "lora", "dora", "adalora", "prefix", "prompt", "freeze", "bitfit")


# ---------------------------------------------------------------------------- presets, bench, MFU

@pytest.mark.parametrize("name, params", [("llama-1b", 1_100_048_384), ("llama-350m", 361_821_120)])
def test_presets_have_the_shapes_of_their_checkpoints(name, params):
    """TinyLlama-1.1B and SmolLM2-360M: the parameter counts of their checkpoints, by the estimator and
    by the model itself (built without memory on the meta device)."""
    cfg = A.preset(name)
    assert cfg.n_kv_head < cfg.n_head  # grouped-query attention
    assert A.estimate_memory(cfg, "full", 1, 16).total_params == params
    with torch.device("meta"):
        assert sum(p.numel() for p in Llama(cfg).parameters()) == params


def test_bench_runs_every_method_on_a_llama_and_skips_bitfit(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--model", "tiny-llama", "--steps", "1", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    assert "bitfit: skipped (BitFit trains bias terms" in capsys.readouterr().err
    data = json.loads((tmp_path / "bench-tiny-llama.json").read_text())
    by = {r["method"]: r for r in data["rows"]}
    assert list(by) == [m for m in bench.METHODS if m != "bitfit"]
    assert "BitFit" in data["meta"]["skipped"] and data["meta"]["lora_targets"] == ",".join(SEVEN)
    c = bench.PRESETS["tiny-llama"]
    kv = c.n_kv_head * c.head_dim
    per_layer = 8 * (2 * (c.n_embd + c.n_embd) + 2 * (c.n_embd + kv) + 3 * (c.n_embd + c.n_inner))  # r (in + out)
    assert by["lora"]["trainable"] == c.n_layer * per_layer  # all seven projections, gate_proj included
    assert by["full"]["trainable"] == by["full"]["total"] and by["probe"]["trainable"] == 0
    assert by["prefix"]["trainable"] == bench.VIRTUAL_TOKENS * 2 * c.n_layer * kv  # GQA: n_kv_head heads
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])


def test_default_targets_and_skips_follow_the_model():
    assert bench.BenchConfig(model="llama-1b").lora_targets == bench.LLAMA_PROJ
    assert bench.BenchConfig(model="gpt2").lora_targets == bench.ALL_PROJ
    assert bench.BenchConfig(model="llama-1b", lora_targets=("q_proj",)).lora_targets == ("q_proj",)
    assert bench.skip_reason("gpt2", "bitfit") is None and bench.skip_reason("llama-1b", "lora") is None
    assert "BitFit trains bias terms" in bench.skip_reason("llama-1b", "bitfit")
    assert A.refusal(LlamaConfig(**TINY, qkv_bias=True), "bitfit") is None  # Qwen2's biases: BitFit has some


def test_bench_takes_plain_ce_and_checkpointing_on_llama():
    cfg = bench.BenchConfig(model="tiny-llama", methods=("full", "lora"), batch=2, seq_len=32, steps=1, warmup=0,
                            device="cpu", plain_ce=True, checkpointing=True)
    rows = bench.run(cfg, progress=lambda s: None)
    assert [r.variant for r in rows] == ["checkpointing+plain_ce"] * 2 and all(r.tokens_per_s > 0 for r in rows)


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_params_count_swiglu_gqa_and_the_head(tie):
    m = Llama(LlamaConfig(**TINY, tie_word_embeddings=tie))
    C, I, KV, V, L = 32, 48, 2 * 8, 97, 4
    per_layer = 2 * C * C + 2 * C * KV + 3 * C * I  # q, o; k, v (GQA: narrower); gate, up, down
    n, nt = bench.matmul_params(m)
    assert n == nt == L * per_layer + V * C  # the head: lm_head, or embed_tokens when tied
    assert bench.matmul_params(m, lm_head=False)[0] == L * per_layer  # probing never projects to the vocabulary
    for p in m.parameters():
        p.requires_grad_(False)
    assert bench.matmul_params(m) == (n, 0)


# ---------------------------------------------------------------------------- the memory estimate on CPU

def build(method: str, dropout: float = 0.0, **kw):
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads) with ``method`` applied as the bench does."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**(TINY | dict(attention_dropout=dropout) | kw))
    model = Llama(cfg)
    fast_loss.enable(model)  # the estimate models the fused loss, which bench and train switch on
    if method == "full":
        full.apply(model)
    elif method in ("lora", "dora"):
        lora.apply(model, lora.LoRAConfig(r=4, targets=SEVEN, dora=method == "dora"))
    elif method == "adalora":
        adalora.apply(model, adalora.AdaLoRAConfig(init_r=6, target_r=4, targets=SEVEN, total_step=10, tinit=0,
                                                   tfinal=0, delta_t=1))
    elif method == "prefix":
        prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=P))
    elif method == "prompt":
        prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=P))
    elif method == "freeze":
        freeze.apply(model, freeze.FreezeConfig(strategy="bottom_up"))
    elif method == "bitfit":
        freeze.bitfit(model)
    return cfg, model.train()


def batch_for(B: int, T: int, mask: bool = False) -> dict:
    ids = torch.randint(1, 90, (B, T), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids} | ({"attention_mask": torch.ones_like(ids)} if mask else {})


def estimate(method, cfg, B, T, **kw):
    return A.estimate_memory(cfg, method, B, T + (P if method in ("prefix", "prompt") else 0), "fp32",
                             device="cpu", **(OPTS.get(method, {}) | kw))


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("B, T", [(3, 12), (2, 3)])  # T = 3 < P: prefix attention takes the bottom-right mask
def test_saved_activations_match_autograd_byte_for_byte(method, dropout, B, T):
    """RMSNorm, RoPE's tables, GQA's repeated keys and values, SwiGLU: the symbolic forward predicts
    exactly what autograd keeps (fp32, CPU; attention dropout sends SDPA down its math path).
    BitFit needs biases: it runs on a Llama with Qwen2's q/k/v biases."""
    cfg, model = build(method, dropout, qkv_bias=method == "bitfit")
    assert saved_bytes(model, batch_for(B, T))[0] == estimate(method, cfg, B, T).activations


@pytest.mark.parametrize("shape", [dict(n_kv_head=4), dict(head_dim=6), dict(attention_bias=True, mlp_bias=True),
                                   dict(tie_word_embeddings=True)],
                         ids=["no-gqa", "head_dim", "biases", "tied"])
@pytest.mark.parametrize("method", ["full", "lora", "prefix", "freeze"])
def test_other_llama_shapes_and_a_padding_mask(shape, method):
    cfg, model = build(method, 0.1, **shape)
    for mask in (False, True):
        got = saved_bytes(model, batch_for(3, 10, mask))[0]
        assert got == estimate(method, cfg, 3, 10, attention_mask=mask).activations


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", TRAINED)
def test_weights_gradients_and_adamw_state_equal_what_one_step_holds(method, tie):
    cfg, model = build(method, tie_word_embeddings=tie, qkv_bias=method == "bitfit")
    est = estimate(method, cfg, 2, 8)
    params = {id(p): p for p in model.parameters()}.values()
    assert (est.trainable_params, est.total_params) == count_trainable(model)
    assert est.weights == sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    model_forward(model, batch_for(2, 8)).loss.backward()
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt.step()
    assert est.optimizer_state == sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())


def test_probe_keeps_every_hidden_state():
    cfg, model = build("full")
    with torch.no_grad():
        out = model(batch_for(2, 12)["input_ids"], output_hidden_states=True, compute_logits=False)
    est = A.estimate_memory(cfg, "probe", 2, 12, "fp32", device="cpu")
    assert est.activations == sum(h.numel() * h.element_size() for h in out.hidden_states)


def test_refusals_and_the_advisor_on_llama():
    cfg = A.preset("llama-1b")
    with pytest.raises(ValueError, match="BitFit trains bias terms"):
        A.estimate_memory(cfg, "bitfit", 1, 16)
    with pytest.raises(ValueError, match="gate_proj is not a projection"):
        A.estimate_memory(A.preset("gpt2"), "lora", 1, 16, targets=("gate_proj",))
    assert A.estimate_memory(cfg, "lora", 1, 16, targets=SEVEN).trainable_params == 22 * 8 * (
        2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 5632))
    rec = A.recommend(cfg, 24, 4, 1024, "qa")
    assert "bitfit" not in [c.method for c in rec.grounded + rec.rejected]
    assert "bitfit left out: BitFit trains bias terms" in rec.summary
    assert rec.grounded[0].method == "lora" and "full" in [c.method for c in rec.rejected]


# ---------------------------------------------------------------------------- the peer on the same shapes

def test_peft_baseline_runs_llama_with_minift_trainable_counts(monkeypatch):
    """benchmarks/peft_baseline.py builds transformers' LlamaForCausalLM from the preset (random init)
    and adapts the same modules: every method trains as many parameters as minift's does, of as many."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pb = benchmark_script("peft_baseline")
    assert pb.peft_targets(SEVEN, "llama") == list(SEVEN)
    cfg = bench.BenchConfig(model="tiny-llama", methods=(), batch=2, seq_len=32, steps=1, warmup=0, device="cpu")
    for method in ("full", "lora", "adalora", "prefix", "prompt"):
        peer = pb.run_peft(cfg, method)
        ours = bench.run_minift(replace(cfg, methods=(method,)), method, None)
        assert peer.trainable == ours.trainable, method
        extra = 2 * len(SEVEN) if method == "adalora" else 0  # PEFT's AdaLoRA: a frozen ranknum per layer
        assert peer.total - ours.total == extra, method
        assert peer.tokens_per_s > 0
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, n: calls.append(n) or real(ps, n))
    clipped = pb.run_peft(replace(cfg, max_grad_norm=1.0), "lora")  # clipping as minift bench --max-grad-norm
    assert "clip1" in clipped.variant and calls == [1.0] * cfg.steps
