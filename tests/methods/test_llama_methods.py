"""Every method besides LoRA on minift's Llama (LoRA: tests/models/test_llama.py): prefix tuning
with grouped-query attention's fewer key/value heads, prompt tuning and AdaLoRA, each against
PEFT (logits and adapter files, both ways); freezing, BitFit and probing."""
import copy

import pytest
import torch

from conftest import hf_llama, peft_adalora_pruned
from minift import adapters
from minift.methods import adalora, freeze, prefix, probe, prompt
from minift.methods.adalora import AdaLoRAConfig
from minift.methods.adalora_alloc import RankAllocator
from minift.methods.freeze import FreezeConfig
from minift.models.llama import Llama, LlamaConfig
from minift.training.forward import model_forward

P, V = 4, 97
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                                    max_position_embeddings=64) | kw)).eval()


def _batch(B=2, T=9, seed=1):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on the second row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _logits(model, b):
    with torch.no_grad():
        return model_forward(model, {**b, "labels": None}).logits


def _close_where_real(a, b, mask, front=0):
    """Same logits at the real tokens (and the ``front`` soft-prompt slots before them)."""
    keep = torch.cat([torch.ones(mask.shape[0], front, dtype=torch.bool), mask.bool()], dim=1)
    torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=0)


def _peft(hf, kind, **kw):
    peft = pytest.importorskip("peft")
    cls = peft.PrefixTuningConfig if kind == "prefix" else peft.PromptTuningConfig
    pm = peft.get_peft_model(hf, cls(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)).eval()
    with torch.no_grad():  # a prefix/prompt large enough to change the outputs a lot
        for p in pm.prompt_encoder.default.parameters():
            p.normal_(0.0, 0.5)
    return pm


# ---------------------------------------------------------------------------- prefix: GQA's key/value heads

def test_prefix_has_the_key_value_heads_of_grouped_query_attention():
    """4 query heads share 2 key/value heads: each layer's prefix is (B, 2, P, head_dim), and the
    table is half as wide as one with a key/value pair per query head."""
    m = _tiny()
    prefix.apply(m, prefix.PrefixConfig(P, projection_dim=8))
    enc = m.prefix_encoder
    assert enc.embedding.shape == (P, 2 * 8)  # the MLP reads rows of one layer's key width, as PEFT's
    kv = enc(3)
    assert len(kv) == 2 and all(k.shape == v.shape == (3, 2, P, 8) for k, v in kv)
    prefix.export(m)
    t = enc.embedding.view(P, 2, 2, 2, 8)  # per token: layer, k|v, key/value head, head_dim
    kv = enc(3)
    assert torch.equal(kv[1][0][2, 1, 3], t[3, 1, 0, 1])  # batch 2, kv head 1, token 3, layer 1 key
    assert torch.equal(kv[0][1][0, 0, 2], t[2, 0, 1, 0])  # layer 0 value
    b = _batch()
    assert _logits(m, b).shape == (2, 9, V)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generation_with_cache_equals_recompute(kind):
    m, ids = _tiny(), _batch()["input_ids"]
    if kind == "prefix":
        prefix.apply(m, prefix.PrefixConfig(P))
        with torch.no_grad():
            m.prefix_encoder.embedding.normal_(0.0, 1.0)
        args, kw = (ids,), {"prefix": m.prefix_encoder(2)}
    else:
        prompt.apply(m, prompt.PromptConfig(P))
        with torch.no_grad():
            args, kw = (None,), {"inputs_embeds": m.soft_prompt.embed(ids)}
    assert torch.equal(m.generate(*args, 8, temperature=0, **kw),
                       m.generate(*args, 8, temperature=0, use_cache=False, **kw))


class _CharTokenizer:
    def encode(self, text):
        return [ord(c) % V for c in text]


def test_token_init_prefix_is_a_cache_of_those_tokens():
    """Keys stored rotated to positions 0 .. P-1, real tokens from position P: running x with the
    prefix of tokens t equals running [t; x] and keeping the last T positions."""
    m = _tiny()
    t = torch.tensor([_CharTokenizer().encode("abcd")])
    x = _batch()["input_ids"][:1]
    with torch.no_grad():
        full = m(torch.cat([t, x], dim=1)).logits[:, P:]
    prefix.apply(m, prefix.PrefixConfig(P, init="tokens", init_text="abcd"), tokenizer=_CharTokenizer())
    with torch.no_grad():
        torch.testing.assert_close(m(x, prefix=m.prefix_encoder(1)).logits, full, atol=1e-5, rtol=0)


def test_prompt_reads_embed_tokens():
    m = _tiny()
    prompt.apply(m, prompt.PromptConfig(5, init="text", init_text="xy"), tokenizer=_CharTokenizer())
    assert torch.equal(m.soft_prompt.embedding, m.embed_tokens(torch.tensor(_CharTokenizer().encode("xyxyx"))))
    assert set(m.state_dict()) - set(_tiny().state_dict()) == {"soft_prompt.embedding"}  # embed_tokens not copied
    b = _batch()
    assert _logits(m, b).shape == (2, 5 + 9, V)


# ---------------------------------------------------------------------------- prefix and prompt: PEFT parity

CASES = ["gqa", "rope-llama3-tied-head_dim"]  # GQA; and head_dim 16 != hidden / heads, RoPE scaled, tied


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@torch.no_grad()
def test_logits_match_peft(tmp_path, kind, case):
    hf, d = hf_llama(tmp_path, case)
    pm = _peft(hf, kind, **({"prefix_projection": True, "encoder_hidden_size": 16} if kind == "prefix" else {}))
    m = Llama.from_pretrained(d).eval()
    if kind == "prefix":
        prefix.apply(m, prefix.PrefixConfig(P, projection_dim=16))
        # the same parameters, PEFT's layout: embedding.weight -> embedding, transform.{0,2}
        m.prefix_encoder.load_state_dict({k.replace("embedding.weight", "embedding"): v
                                          for k, v in pm.prompt_encoder.default.state_dict().items()})
    else:
        prompt.apply(m, prompt.PromptConfig(P))
        m.soft_prompt.embedding.copy_(pm.prompt_encoder.default.embedding.weight)
    b = _batch()
    ref, front = pm(**b), (P if kind == "prompt" else 0)
    out = _logits(m, b)
    base = Llama.from_pretrained(d).eval()(b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (out[:, front:] - base).abs().max() > 0.1  # the prefix/prompt matters
    _close_where_real(out, ref.logits, b["attention_mask"], front)
    torch.testing.assert_close(model_forward(m, b).loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_peft_files_load_both_ways(tmp_path, kind, case):
    """PEFT sizes a Llama prefix by num_key_value_heads (token_dim = n_kv_head * head_dim):
    minift's file says the same, and each side loads the other's with the same logits."""
    peft = pytest.importorskip("peft")
    hf, d = hf_llama(tmp_path / "base", case)
    pm = _peft(hf, kind, **({"prefix_projection": True, "encoder_hidden_size": 16} if kind == "prefix" else {}))
    b, front = _batch(), (P if kind == "prompt" else 0)
    with torch.no_grad():
        ref = pm(**b).logits
    pm.save_pretrained(tmp_path / "peft")  # PEFT writes the MLP's output table
    m = adapters.load_adapter(Llama.from_pretrained(d).eval(), tmp_path / "peft")
    _close_where_real(_logits(m, b), ref, b["attention_mask"], front)

    # the reverse: minift (reparameterized prefix / prompt) -> PEFT file -> PEFT model
    m2 = Llama.from_pretrained(d).eval()
    if kind == "prefix":
        prefix.apply(m2, prefix.PrefixConfig(P, projection_dim=8))
    else:
        prompt.apply(m2, prompt.PromptConfig(P, init="vocab"))
    adapters.save_adapter(m2, tmp_path / "mine", layout="peft")
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "mine")
    for k in ("token_dim", "num_attention_heads", "num_layers"):
        assert getattr(theirs, k) == getattr(pm.peft_config["default"], k), k
    hf2, _ = hf_llama(tmp_path / "base2", case)
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "mine").eval()
    with torch.no_grad():
        want = pm2(**b).logits
    _close_where_real(_logits(m2, b), want, b["attention_mask"], front)


def test_a_prefix_for_other_key_value_heads_is_refused(tmp_path):
    """A prefix saved on a Llama with 2 key/value heads does not fit one with 4."""
    m = _tiny()
    prefix.apply(m, prefix.PrefixConfig(P))
    adapters.save_adapter(m, tmp_path, layout="peft")
    with pytest.raises(adapters.InputError, match="token_dim=16, this model has 32"):
        adapters.load_adapter(_tiny(n_kv_head=4), tmp_path)


# ---------------------------------------------------------------------------- AdaLoRA

def test_adalora_on_all_seven_projections_peft_files_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    hf, d = hf_llama(tmp_path / "base", "gqa")
    ids = _batch()["input_ids"]

    # minift -> PEFT: AdaLoRA on q, k, v, o, gate, up and down, pruned by minift's allocator
    model = Llama.from_pretrained(d).eval()
    cfg = AdaLoRAConfig(init_r=6, target_r=2, alpha=8, tinit=2, tfinal=3, delta_t=2, total_step=14, targets=SEVEN)
    assert len(adalora.apply(model, cfg)) == 2 * 7
    g = torch.Generator().manual_seed(0)
    mods = adalora.svd_modules(model)
    with torch.no_grad():
        for _, mod in mods:
            mod.lora_E.copy_(torch.randn(mod.lora_E.shape, generator=g))
    alloc = RankAllocator(model, cfg)
    for _, mod in mods:
        for p in (mod.lora_A, mod.lora_E, mod.lora_B):
            p.grad = torch.randn(p.shape, generator=g)
    alloc.step(model, 10)  # scores from these gradients,
    alloc.step(model, 11)  # then the final prune, to the target
    assert sum(int(mod.lora_E.ne(0).sum()) for _, mod in mods) == 2 * 14
    adapters.save_adapter(model, tmp_path / "mine", layout="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "mine").eval()
    with torch.no_grad():
        want, got = theirs(input_ids=ids).logits, model(ids).logits
        assert (got - hf(input_ids=ids).logits).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # PEFT -> minift: a PEFT AdaLoRA, pruned by its own allocator, saved by save_pretrained
    pm = peft_adalora_pruned(hf, tmp_path, target_modules=list(SEVEN), task_type="CAUSAL_LM")
    mine = adapters.load_adapter(Llama.from_pretrained(d).eval(), tmp_path / "peft")
    assert {n.rsplit(".", 1)[1] for n, _ in adalora.svd_modules(mine)} == set(SEVEN)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- freezing, BitFit, probing

@pytest.mark.parametrize("tied", [False, True])
def test_freeze_bottom_half(tied):
    """Frozen: embed_tokens and block 0. The final RMSNorm and an untied lm_head follow the top
    block; a tied head is embed_tokens and stays frozen with it. Block 0 runs without autograd."""
    m = _tiny(n_layer=4, tie_word_embeddings=tied)
    names = freeze.apply(m, FreezeConfig("bottom_up"))
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers.") else "") for n in names} == \
        {"layers.2", "layers.3", "norm"} | (set() if tied else {"lm_head"})
    assert m.grad_from_layer == 2
    b = _batch()
    model_forward(m, b).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="layer 4 is out of range: the model has layers 0..3"):
        freeze.apply(m, FreezeConfig("layers", layers=(4,)))


def test_bitfit_refuses_a_llama_without_biases_and_trains_qwen2_biases():
    m = _tiny()
    with pytest.raises(ValueError, match=r"^BitFit trains bias terms and this Llama has none") as e:
        freeze.bitfit(m)
    assert "\n" not in str(e.value)
    assert all(p.requires_grad for p in m.parameters())  # refused before anything was frozen
    m = _tiny(qkv_bias=True)  # Qwen2: biases on q, k and v
    names = freeze.bitfit(m)
    assert sorted(names) == sorted(f"layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv")
    assert m.grad_from_layer == 0


def test_probe_reads_every_hidden_state():
    m = _tiny()
    b = _batch()
    feats = probe.extract_features(m, [b], pooling="last")
    assert len(feats) == 3 and all(f.shape == (2, 32) for f in feats)
    with torch.no_grad():
        hs = m(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[2][1], hs[2][1, 5])  # the padded row: its last real token
    torch.testing.assert_close(feats[1][0], hs[1][0, 8])


def test_minift_train_prefix_on_a_llama_and_bitfit_refused(tmp_path, capsys):
    """`minift train --method prefix` on an HF Llama directory trains a prefix of n_kv_head heads
    and `minift eval` scores it; `--method bitfit` exits 2 with the one-line reason."""
    import json

    from conftest import llama_dir
    from minift.cli import main
    d, _ = llama_dir(tmp_path)
    argv = ["train", "--model", d, "--train", tmp_path / "lm.txt", "--task", "causal-lm", "--max-len", "16",
            "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", "--no-progress"]
    assert main([str(a) for a in argv + ["--method", "prefix", "--num-virtual-tokens", "4",
                                         "--out", tmp_path / "run"]]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["token_dim"], config["num_attention_heads"]) == (2 * 8, 2)  # 2 key/value heads of 8
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(tmp_path / "lm.txt"),
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
    assert main([str(a) for a in argv + ["--method", "bitfit", "--out", tmp_path / "bitfit"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("BitFit trains bias terms and this Llama has none (no attention or MLP biases); "
                        "choose another method, e.g. lora") and "\n" not in err
