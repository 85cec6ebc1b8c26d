"""minift's Llama against transformers' LlamaForCausalLM (and Qwen2ForCausalLM): logits, loss,
hidden states, greedy generation, checkpoints both ways; the KV cache and prefix; LoRA on it."""
import json

import pytest
import torch

from minift.files import InputError
from minift.methods import lora
from minift.models.llama import Llama, LlamaConfig
from minift.models.rope import RopeScaling

from conftest import LLAMA_CASES as CASES, hf_llama

V = 97  # LLAMA_HF's vocabulary


def _ids(B=2, T=10, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _tiny(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                                    max_position_embeddings=64) | kw)).eval()


# ---------------------------------------------------------------------------- parity with transformers

@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
def test_hf_checkpoint_loads_with_the_same_logits_and_hidden_states(tmp_path, case):
    hf, d = hf_llama(tmp_path, case)
    m = Llama.from_pretrained(d).eval()
    assert m.config.tie_word_embeddings == (m.lm_head is None) == ("tied" in case)
    x = _ids()
    ref, out = hf(x, output_hidden_states=True), m(x, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", ["gqa", "rope-llama3-tied-head_dim"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_parity_with_padding_mask(tmp_path, case, side):
    hf, d = hf_llama(tmp_path, case)
    m = Llama.from_pretrained(d).eval()
    x, mask = _ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0 if side == "right" else 1
    mask[1, :4] = 0 if side == "left" else 1
    keep = mask.bool()  # padded positions are ignored by definition
    torch.testing.assert_close(m(x, attention_mask=mask).logits[keep], hf(x, attention_mask=mask).logits[keep],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gqa", "mqa-tied"])
def test_loss_matches_hf(tmp_path, case):
    hf, d = hf_llama(tmp_path, case)
    m = Llama.from_pretrained(d).eval()
    x = _ids()
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref, out = hf(x, labels=labels), m(x, labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert out.logits is None  # training needs only the loss
    both = m(x, labels=labels, compute_logits=True)
    torch.testing.assert_close(both.logits, ref.logits, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("case", ["gqa", "rope-llama3-tied-head_dim"])
def test_greedy_generation_is_token_identical_to_hf(tmp_path, case):
    hf, d = hf_llama(tmp_path, case)
    m = Llama.from_pretrained(d).eval()
    x = _ids(B=2, T=5)
    ref = hf.generate(x, max_new_tokens=20, do_sample=False)
    out = m.generate(x, 20, temperature=0.0)
    assert ref.shape == (2, 25)
    assert torch.equal(out, ref)
    assert torch.equal(m.generate(x, 20, temperature=0.0, use_cache=False), ref)


@torch.no_grad()
@pytest.mark.parametrize("case", ["gqa", "mqa-tied", "rope-linear", "rope-llama3-tied-head_dim", "biases"])
def test_save_pretrained_loads_into_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    _, d = hf_llama(tmp_path / "hf", case)
    m = Llama.from_pretrained(d).eval()
    with torch.no_grad():  # move every weight, so nothing can pass by coming from the HF file
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "minift")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "minift").eval()
    x = _ids()
    torch.testing.assert_close(hf(x).logits, m(x).logits, atol=1e-5, rtol=0)
    again = Llama.from_pretrained(tmp_path / "minift")
    assert again.config == m.config
    assert m.state_dict().keys() == again.state_dict().keys()
    for (k, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@torch.no_grad()
def test_qwen2_qkv_biases_both_ways(tmp_path):
    """Qwen2: Llama with biases on q, k and v only."""
    transformers = pytest.importorskip("transformers")
    hf, d = hf_llama(tmp_path / "hf", "gqa", qwen2=True)
    m = Llama.from_pretrained(d).eval()
    assert m.config.qkv_bias and not m.config.attention_bias
    assert m.layers[0].self_attn.k_proj.bias is not None and m.layers[0].self_attn.o_proj.bias is None
    x = _ids()
    torch.testing.assert_close(m(x).logits, hf(x).logits, atol=1e-5, rtol=0)
    m.save_pretrained(tmp_path / "minift")
    assert json.loads((tmp_path / "minift" / "config.json").read_text())["model_type"] == "qwen2"
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "minift").eval()
    torch.testing.assert_close(back(x).logits, m(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_legacy_config_fields_rope_theta_and_rope_scaling(tmp_path):
    """transformers < 5 wrote rope_theta and rope_scaling (kind under "type"); 5 writes rope_parameters."""
    hf, d = hf_llama(tmp_path, "rope-linear")
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg |= {"rope_theta": rp["rope_theta"], "rope_scaling": {"type": "linear", "factor": rp["factor"]}}
    (d / "config.json").write_text(json.dumps(cfg))
    m = Llama.from_pretrained(d).eval()
    assert m.config.rope_theta == 500.0 and m.config.rope_scaling == RopeScaling("linear", 4.0)
    x = _ids()
    torch.testing.assert_close(m(x).logits, hf(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit,match", [
    (dict(hidden_act="gelu"), 'hidden_act="gelu" is not supported'),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), 'rope scaling "yarn" is not supported'),
    (dict(rope_parameters={"rope_type": "linear"}), "'factor' is missing"),
    (dict(num_key_value_heads=3), "multiple of n_kv_head"),
    (dict(model_type="mistral"), "model_type 'mistral'"),
])
def test_config_minift_cannot_compute_is_refused_in_one_line(tmp_path, edit, match):
    _, d = hf_llama(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(InputError, match=match) as e:
        Llama.from_pretrained(d)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


# ---------------------------------------------------------------------------- KV cache, prefix, hooks

@torch.no_grad()
@pytest.mark.parametrize("P", [3, 8, 11])
def test_prefix_of_own_kv_reproduces_full_sequence(P):
    """A prefix holding the first P positions' own (rotated, n_kv_head-headed) keys/values is
    exactly the KV cache: P < T, P = T - 4 and P > T (the three attention paths)."""
    m = _tiny(rope_scaling=RopeScaling("linear", 2.0))
    x = _ids(B=2, T=12)
    full = m(x, return_kv=True)
    assert full.kv[0][0].shape == (2, 2, 12, 8)  # (B, n_kv_head, T, head_dim)
    prefix = [(k[:, :, :P], v[:, :, :P]) for k, v in full.kv]
    torch.testing.assert_close(m(x[:, P:], prefix=prefix).logits, full.logits[:, P:], atol=1e-5, rtol=0)
    mask = torch.ones(2, 12, dtype=torch.long)  # the same through the dense-bias path
    torch.testing.assert_close(m(x[:, P:], prefix=prefix, attention_mask=mask).logits, full.logits[:, P:],
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_sampled_generation_with_cache_equals_recompute():
    m = _tiny()
    x = _ids(B=2, T=5)
    torch.manual_seed(7)
    a = m.generate(x, 12, 1.0, 5, use_cache=True)
    torch.manual_seed(7)
    b = m.generate(x, 12, 1.0, 5, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a, b)
    new = m.generate(None, 4, 0.0, inputs_embeds=m.embed_tokens(x))
    assert torch.equal(new, m.generate(x, 4, 0.0)[:, 5:])


def test_checkpointing_gives_the_same_loss_and_gradients():
    m, x = _tiny(), _ids()
    m.train()
    m(x, x).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.checkpointing = True
    m(x, x).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=0, msg=n)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(n_head=5, n_embd=32)
    with pytest.raises(ValueError, match="not supported"):
        RopeScaling("yarn", 2.0)
    m = _tiny()
    with pytest.raises(ValueError, match="exactly one"):
        m()
    with pytest.raises(ValueError, match="prefix has 0 layers"):
        m(_ids(), prefix=[])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        m.generate(_ids(), 2, top_k=0)


# ---------------------------------------------------------------------------- LoRA on Llama

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _perturb_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_all_seven_projections_trains_and_merges(dora):
    m, x = _tiny(), _ids()
    with torch.no_grad():
        base = m(x).logits
    names = lora.apply(m, lora.LoRAConfig(r=4, alpha=8, targets=SEVEN, dora=dora))
    assert len(names) == 7 * 2 and {n.rsplit(".", 1)[1] for n in names} == set(SEVEN)
    with torch.no_grad():
        assert torch.equal(m(x).logits, base)  # B = 0: the adapted model starts as the base
    _perturb_b(m)
    m(x, x).loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(m.get_parameter(n).grad is not None and m.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    with torch.no_grad():
        unmerged = m(x).logits
        lora.merge(m)
        torch.testing.assert_close(m(x).logits, unmerged, atol=1e-5, rtol=0)


def test_lora_on_an_untied_lm_head_is_used_by_the_loss():
    """An adapter on lm_head runs its own forward; the loss is then computed from its logits."""
    m, x = _tiny(), _ids()
    lora.apply(m, lora.LoRAConfig(r=4, targets=("q_proj", "lm_head")))
    _perturb_b(m)
    out = m(x, x, compute_logits=True)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain, atol=1e-6, rtol=0)
    out.loss.backward()
    assert m.lm_head.lora_B.grad is not None
    lora.unload(m)
    torch.testing.assert_close(m(x, x).loss, out.loss, atol=1e-5, rtol=0)


def test_lora_through_the_registry_and_the_training_forward_lowers_the_loss():
    """The path ``minift train`` takes: build_method by name, batches through model_forward."""
    from minift.methods.registry import build_method
    from minift.training.forward import model_forward
    m = _tiny()
    st = build_method(m, "lora", {"r": 4, "alpha": 8, "targets": list(SEVEN)})
    assert len(st.changed) == 14
    ids = _ids(B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model_forward(m, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ---------------------------------------------------------------------------- PEFT adapter files

@pytest.mark.parametrize("case", ["gqa", "mqa-tied"])
def test_lora_adapter_files_both_ways_with_peft(tmp_path, case):
    """minift's LoRA on Llama saved in PEFT's layout loads in PEFT with the same logits, and a
    PEFT-written Llama LoRA loads into minift: PEFT's module names are minift's under ``model.``."""
    peft = pytest.importorskip("peft")
    from minift import adapters
    from minift.methods import lora
    hf, d = hf_llama(tmp_path / "base", case)
    ids = _ids()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model = Llama.from_pretrained(d).eval()
    lora.apply(model, lora.LoRAConfig(r=2, alpha=5, targets=targets))
    _perturb_b(model)
    adapters.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        want, got = pm(input_ids=ids).logits, model(ids).logits
        assert (Llama.from_pretrained(d)(ids).logits - want).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    hf2, _ = hf_llama(tmp_path / "base2", case)
    theirs = peft.get_peft_model(hf2, peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded = adapters.load_adapter(Llama.from_pretrained(tmp_path / "base2").eval(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_minift_train_and_eval_a_llama_lora_from_the_cli(tmp_path, capsys):
    """`minift train --task causal-lm` on an HF Llama directory: it trains, writes minift's and
    PEFT's adapter files, and `minift eval` scores the adapter."""
    import json

    from conftest import llama_dir
    from minift.cli import main
    d, _ = llama_dir(tmp_path)
    argv = ["train", "--model", d, "--train", tmp_path / "lm.txt", "--task", "causal-lm", "--method", "lora",
            "--targets", "q_proj,v_proj,gate_proj", "--r", "2", "--max-len", "16", "--steps", "3", "--batch-size",
            "4", "--lr", "1e-2", "--device", "cpu", "--no-progress", "--out", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(tmp_path / "lm.txt"),
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1.0
