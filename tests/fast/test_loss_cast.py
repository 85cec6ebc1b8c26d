"""The fast pieces of the models equal their references: the fused linear cross-entropy
(``minift.fast.loss``) equals GPT's plain ``LMLoss``, and cast-once (``minift.fast.cast``)
equals plain autocast; values and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BERT, TINY_GPT
from minift.fast import cast as fast_cast
from minift.fast import loss as fast_loss
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig, LMLoss
from minift.models.llama import Llama, LlamaConfig


def _ids(B=3, T=12, vocab=97, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model, loss):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)))


def _assert_same(a: dict, b: dict, atol, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
            continue
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


# ---------------------------------------------------------------------------- fused loss


@pytest.mark.parametrize("V,chunk,head_trained", [(97, 5, True), (128, 7, False), (64, 1000, True)])
def test_fused_lm_loss_matches_plain_cross_entropy(V, chunk, head_trained):
    """Loss and both gradients equal the naive loss's (fp64): vocabulary padded to 64 or not,
    several chunks or one, targets -100 ignored, the head trained or frozen, and the gradient
    computed in forward scaled by whatever multiplies the loss afterwards."""
    from minift.fast.loss import lm_loss
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, 11, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64, generator=g, requires_grad=head_trained)
    t = torch.randint(0, V, (3, 11), generator=g)
    t[0, :5] = -100
    wanted = (x, w) if head_trained else (x,)
    got = torch.autograd.grad(-2.5 * lm_loss(x, w, t, chunk=chunk), wanted)
    plain = torch.nn.functional.cross_entropy((x[:, :-1] @ w.t()).reshape(-1, V), t[:, 1:].reshape(-1))
    ref = torch.autograd.grad(-2.5 * plain, wanted)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(lm_loss(x, w, t, chunk=chunk), plain.detach(), atol=1e-12, rtol=0)
    t[:] = -100  # nothing to predict: a zero loss that still backpropagates (zeros)
    empty = lm_loss(x, w, t, chunk=chunk)
    assert empty.item() == 0.0
    assert not torch.autograd.grad(empty, x)[0].any()


def test_fused_lm_loss_frees_each_chunk_and_checks_targets(monkeypatch):
    """Only one chunk's logits are alive at a time (the memory estimate counts one); target ids
    outside the vocabulary are an error, not a clamped or infinite loss; double backward fails."""
    import weakref
    from minift.fast import loss as L
    previous, calls = [], []
    original = L._chunk_loss

    def spy(logits, t, V):
        calls.append(all(r() is None for r in previous))  # the last chunk's log-probs are gone
        out = original(logits, t, V)
        previous.append(weakref.ref(out[1]))
        return out

    monkeypatch.setattr(L, "_chunk_loss", spy)
    x = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(70, 8, requires_grad=True)
    t = torch.randint(0, 70, (2, 9))
    L.lm_loss(x, w, t, chunk=3).backward()
    assert len(calls) == 6 and all(calls)
    for bad in (70, -1, -101):
        t2 = t.clone()
        t2[1, 4] = bad
        with pytest.raises(ValueError, match=r"outside the vocabulary: allowed are 0\.\.69, or -100"):
            L.lm_loss(x, w, t2, chunk=3)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(L.lm_loss(x, w, t, chunk=3), x, create_graph=True)
    one = L.lm_loss(torch.randn(2, 1, 8), w, t[:, :1])  # one position: nothing to predict
    assert one.item() == 0.0 and one.dtype == torch.float32 and one.requires_grad  # the head alone is trained
    one.backward()


def _gpt_loss_and_grads(model, fused: bool, **batch):
    model = copy.deepcopy(model)
    if fused:
        assert fast_loss.enable(model, chunk=batch.pop("chunk", None)) == ["lm_loss"]
    else:
        batch.pop("chunk", None)
    out = model(**batch)
    return out.loss.detach(), _grads(model, -1.5 * out.loss)


@pytest.mark.parametrize("sizes", [[2, 2, 2], [1, 3], [4], [3, 1, 2]])
def test_grouped_loss_equals_one_fused_loss_per_group(sizes):
    """grouped_lm_loss: each group's loss and the gradients of their sum equal K lm_loss calls,
    a group with no target included (loss 0, no gradient)."""
    torch.manual_seed(0)
    V, C, T, B = 50, 16, 7, sum(sizes)
    w = torch.randn(V, C, requires_grad=True)
    x = torch.randn(B, T, C, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    t[0, :4] = -100
    if len(sizes) > 1:
        t[sizes[0]:sizes[0] + sizes[1]] = -100  # the second group predicts nothing
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def plain(a, b):  # the mean next-token CE over the group's targets from full logits (0 with none)
        logits, y = (x[a:b] @ w.t())[:, :-1].reshape(-1, V), t[a:b, 1:].reshape(-1)
        return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum") / (y != -100).sum().clamp_min(1)
    want = torch.stack([plain(a, b) for a, b in zip(bounds, bounds[1:])])
    (-1.5 * want.sum()).backward()  # an upstream gradient other than 1
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    total, per_group = fast_loss.grouped_lm_loss(x, w, t, sizes, chunk=5)
    (-1.5 * total).backward()
    assert not per_group.requires_grad
    torch.testing.assert_close(per_group, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, want.sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, gx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.grad, gw, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="do not add up"):
        fast_loss.grouped_lm_loss(x, w, t, sizes + [1])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        fast_loss.grouped_lm_loss(x, w, t, sizes, chunk=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_grouped_loss_on_cuda_under_autocast():
    torch.manual_seed(0)
    w = torch.randn(50, 16, device="cuda", requires_grad=True)
    x = torch.randn(5, 7, 16, device="cuda", requires_grad=True)
    t = torch.randint(0, 50, (5, 7), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = torch.stack([fast_loss.lm_loss(x[a:b], w, t[a:b]) for a, b in ((0, 2), (2, 5))])
        total, per_group = fast_loss.grouped_lm_loss(x, w, t, [2, 3])
    torch.testing.assert_close(per_group, want.detach().float(), atol=1e-5, rtol=1e-5)
    want.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    total.backward()
    # bf16 tolerances: the grouped pass scales each row's gradient before its cast to bf16, the
    # separate calls after it
    torch.testing.assert_close(x.grad, gx, atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(w.grad, gw, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("chunk", [None, 5])
def test_fused_loss_equals_plain_loss_in_the_model(chunk):
    """GPT with the fused loss switched on: the same loss and the same gradient for every
    parameter (fp32), with -100 targets, padding and several chunks or one."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT)).train()
    ids = _ids()
    targets = ids.clone()
    targets[0, :4] = -100  # a prompt without loss
    targets[2, 9:] = -100  # padding
    mask = (targets != -100).long()
    mask[0] = 1
    batch = dict(input_ids=ids, targets=targets, attention_mask=mask, chunk=chunk)
    ref_loss, ref = _gpt_loss_and_grads(model, False, **batch)
    got_loss, got = _gpt_loss_and_grads(model, True, **batch)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=0)
    _assert_same(got, ref, atol=1e-6)


def test_fused_loss_equals_plain_loss_on_a_soft_prompt_batch():
    """Prompt tuning shifts the targets: its P virtual positions are -100 and the last one
    predicts the first real token. Only the soft prompt is trained; its gradient agrees."""
    from minift.methods import prompt
    from minift.training.forward import model_forward
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT)).train()
    prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=4))
    ids = _ids(T=9)
    labels = ids.clone()
    labels[1, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        if fused:
            fast_loss.enable(m, chunk=7)
        loss = model_forward(m, batch).loss
        results.append((loss.detach(), _grads(m, loss)))
    (ref_loss, ref), (got_loss, got) = results
    assert list(ref) == ["soft_prompt.embedding"]
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=0)
    _assert_same(got, ref, atol=1e-6)


@pytest.mark.parametrize("T", [1, 6])
def test_fused_and_plain_loss_agree_when_there_is_nothing_to_predict(T):
    """All targets -100, or one position: both losses are 0 (not NaN) and backpropagate zeros."""
    torch.manual_seed(0)
    x = torch.randn(2, T, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.full((2, T), -100)
    for loss_fn in (LMLoss(), fast_loss.FusedLMLoss(chunk=2)):
        loss = loss_fn(x, w, t)
        assert loss.item() == 0.0
        gx, gw = torch.autograd.grad(loss, (x, w), allow_unused=True)
        assert all(g is None or not g.any() for g in (gx, gw))


def test_enable_and_disable_swap_only_the_loss_module(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    keys = list(model.state_dict())
    assert fast_loss.enable(model, chunk=8) == ["lm_loss"]
    assert isinstance(model.lm_loss, fast_loss.FusedLMLoss) and model.lm_loss.chunk == 8
    assert fast_loss.enable(model) == []  # already on
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "gpt")  # a module without tensors is no adapter
    assert list(GPT.from_pretrained(tmp_path / "gpt").state_dict()) == keys
    assert fast_loss.disable(model) == ["lm_loss"] and type(model.lm_loss) is LMLoss
    assert fast_loss.enable(BertClassifier(BertConfig(**TINY_BERT))) == []  # no LM loss to fuse
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        fast_loss.enable(model, chunk=0)


# ---------------------------------------------------------------------------- cast once

def _cpu_bf16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def _tiny(kind: str, lora: bool):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(**TINY_GPT))
    elif kind == "llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        model = Llama(LlamaConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                                  max_position_embeddings=64))
    else:
        model = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3)
    if lora:
        from minift.methods import lora as lora_method
        lora_method.apply(model, lora_method.LoRAConfig(r=4, targets=("q_proj", "k_proj", "v_proj", "up_proj")))
        for name, p in model.named_parameters():  # a non-zero B, so the adapters change the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _run(model, kind: str, autocast: bool):
    ids = _ids(vocab=97)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        if kind in ("gpt", "llama"):
            out = model(ids, ids, compute_logits=True)
        else:
            mask = torch.ones_like(ids)
            mask[1, 8:] = 0
            out = model(ids, mask, labels=torch.tensor([0, 1, 2]))
    return out.logits.detach(), _grads(model, out.loss)


@pytest.mark.parametrize("kind", ["gpt", "bert", "llama"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_cast_once_equals_plain_autocast(kind, lora, autocast):
    """Outside autocast the hook does nothing: bit-identical. Under bf16 autocast the forward
    is identical (one copy holds the values each per-use cast makes) and the gradients agree
    up to bf16 rounding (the shared copy's input gradient is summed in bf16): cast-once moves
    each gradient no further from plain autocast's than autocast itself is from fp32."""
    if autocast and not _cpu_bf16_autocast():
        pytest.skip("no bf16 autocast on this CPU")
    model = _tiny(kind, lora)
    ref_logits, ref = _run(copy.deepcopy(model), kind, autocast)
    fast = copy.deepcopy(model)
    names = fast_cast.enable(fast)
    assert len(names) == 2 * len(fast.layers) and all(n.endswith((".attn", ".self_attn", ".mlp")) for n in names)
    got_logits, got = _run(fast, kind, autocast)
    if not autocast:
        assert torch.equal(got_logits, ref_logits)
        _assert_same(got, ref, atol=0)
        return
    torch.testing.assert_close(got_logits, ref_logits, atol=0, rtol=0)
    _, fp32 = _run(copy.deepcopy(model), kind, autocast=False)
    for k in ref:
        if ref[k] is not None:
            noise = (ref[k] - fp32[k]).abs().max()
            assert (got[k] - ref[k]).abs().max() <= 4 * noise + 1e-6, k


def test_cast_once_keeps_one_copy_and_changes_no_keys():
    """Under autocast the attention keeps one bf16 copy of its input for q, k and v (not
    three); the module tree and state-dict keys are unchanged; disable removes the hooks."""
    if not _cpu_bf16_autocast():
        pytest.skip("no bf16 autocast on this CPU")
    model = _tiny("gpt", lora=False)
    keys = list(model.state_dict())

    def saved_bytes():
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(_ids(), _ids())
        return sum(sizes.values())

    plain = saved_bytes()
    assert fast_cast.enable(model) and fast_cast.enable(model) == []
    once = saved_bytes()
    B, T, C = 3, 12, TINY_GPT["n_embd"]
    assert plain - once == len(model.layers) * 2 * (B * T * C * 2)  # q/k/v: 3 copies -> 1, in bf16
    assert list(model.state_dict()) == keys
    assert len(fast_cast.disable(model)) == 2 * len(model.layers)
    assert saved_bytes() == plain
