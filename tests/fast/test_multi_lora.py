"""fast.multi_lora (gathered mixed batches) against the reference MultiLoRALinear: outputs and gradients."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_GPT
from minift import fast
from minift.fast.multi_lora import GatheredMultiLoRALinear
from minift.methods.lora import LoRAConfig
from minift.methods.multi_lora import add_adapter, mixed_batch, multi_lora_modules, set_active
from minift.models.gpt import GPT, GPTConfig

# different ranks, alphas, rsLoRA and targets: a layer holds 1-3 adapters, padded to its largest rank
ADAPTERS = {"a": LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj", "up_proj")),
            "b": LoRAConfig(r=4, alpha=3, targets=("q_proj", "v_proj", "up_proj", "down_proj"), rslora=True),
            "c": LoRAConfig(r=1, alpha=8, targets=("q_proj", "up_proj"))}


def pair(seed=0):
    torch.manual_seed(seed)
    ref = GPT(GPTConfig(**TINY_GPT, dropout=0.0))
    for name, cfg in ADAPTERS.items():
        add_adapter(ref, name, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fst = copy.deepcopy(ref)
    switched = fast.multi_lora.enable(fst)
    assert switched and all(type(m) is GatheredMultiLoRALinear for _, m in multi_lora_modules(fst))
    return ref, fst


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6), seed=st.integers(0, 3))
def test_gathered_mixed_batch_equals_the_reference_outputs_and_gradients(rows, seed):
    ref, fst = pair(seed)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (len(rows), 7), generator=torch.Generator().manual_seed(seed))
    assert_same_outputs_and_gradients(ref, fst, rows, ids)


def assert_same_outputs_and_gradients(ref, fst, rows, ids, inside=None):
    """One mixed batch forward and backward through each model: logits and adapter gradients equal
    (1e-5). ``inside()`` runs within the fast model's mixed batch, after its forward."""
    grads = []
    for m in (ref, fst):
        with mixed_batch(m, rows):
            logits = m(ids).logits
            if m is fst and inside is not None:
                inside()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if "lora_" in n and p.grad is not None})
        m.out = logits.detach()
    torch.testing.assert_close(fst.out, ref.out, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-5)


def test_rows_without_an_adapter_here_dropout_and_one_adapter_take_the_reference_forward():
    ref, fst = pair()
    ids = torch.randint(0, TINY_GPT["vocab_size"], (3, 5))
    for rows in (["a", None, "b"], ["c", "c", "a"]):  # None: base only; c does not target v_proj
        with torch.no_grad(), mixed_batch(ref, rows), mixed_batch(fst, rows):
            torch.testing.assert_close(fst(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    set_active(ref, "b"), set_active(fst, "b")
    with torch.no_grad():
        torch.testing.assert_close(fst(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    layer = dict(multi_lora_modules(fst))["layers.0.attn.q_proj"]
    layer.dropout["a"] = torch.nn.Dropout(0.5)
    layer.train()
    with mixed_batch(fst, ["a", "b", "c"]):
        assert layer._slots(3) is None  # dropout while training: the reference draws its masks
    layer.eval()
    with mixed_batch(fst, ["a", "b", "c"]):
        assert layer._slots(3) is not None


def test_generation_with_a_kv_cache_and_a_new_mixed_batch_each_time():
    ref, fst = pair()
    prompt = torch.randint(0, TINY_GPT["vocab_size"], (4, 3))
    # a second batch must not reuse the first's slots; the last two are blocks
    for rows in (["a", "b", "c", "a"], ["b", "b", "a", "c"], ["a", "a", "b", "b"], ["c", "c", "b", "b"]):
        outs = []
        for m in (ref, fst):
            m.eval()
            with mixed_batch(m, rows):
                outs.append(m.generate(prompt, max_new_tokens=4, temperature=0))
        assert torch.equal(outs[0], outs[1])


def test_enable_and_disable_through_fast():
    _, fst = pair()
    ref = copy.deepcopy(fst)
    fast.multi_lora.disable(ref)
    assert not any(type(m) is GatheredMultiLoRALinear for _, m in multi_lora_modules(ref))
    assert any("gathered mixed-batch LoRA" in line for line in fast.enable(ref))
    assert fast.multi_lora.enable(ref) == []  # already on
    assert fast.disable(ref) and not any(type(m) is GatheredMultiLoRALinear for _, m in multi_lora_modules(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_gathered_mixed_batch_on_cuda_under_autocast():
    ref, fst = pair()
    ref, fst = ref.cuda(), fst.cuda()
    ids = torch.randint(0, TINY_GPT["vocab_size"], (6, 9), device="cuda")
    for rows in (["a", "b", "c", "c", "b", "a"], ["b", "b", "c", "c", "a", "a"]):  # gathered, then blocks
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            with mixed_batch(ref, rows), mixed_batch(fst, rows):
                torch.testing.assert_close(fst(ids).logits.float(), ref(ids).logits.float(), atol=3e-2, rtol=3e-2)
    rows = ["b", "b", "c", "c", "a", "a"]  # blocks, training: gradients under autocast as well
    q = dict(multi_lora_modules(fst))["layers.0.attn.q_proj"]  # every adapter targets q_proj
    grads = []
    for m in (ref, fst):
        with torch.autocast("cuda", dtype=torch.bfloat16), mixed_batch(m, rows):
            m(ids).logits.float().logsumexp(-1).mean().backward()
            if m is fst:
                assert q._blocks(len(rows)) == ("b", "c", "a")  # the block path ran
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=3e-2, rtol=5e-2, msg=n)


def test_adapters_of_one_rank_stack_without_padding_and_match_the_reference():
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**TINY_GPT, dropout=0.0))
    for name, alpha in (("x", 4), ("y", 16), ("z", 2)):  # one rank, three scalings
        add_adapter(ref, name, LoRAConfig(r=3, alpha=alpha, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    fst = copy.deepcopy(ref)
    fast.multi_lora.enable(fst)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (5, 6))
    rows = ["z", "x", "y", "x", "z"]
    with torch.no_grad(), mixed_batch(ref, rows), mixed_batch(fst, rows):
        torch.testing.assert_close(fst(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(["a", "b", "c"]), k=st.integers(1, 3), n=st.integers(1, 3), seed=st.integers(0, 3))
def test_equal_blocks_of_rows_take_the_block_path_and_equal_the_reference(order, k, n, seed):
    """k adapters' rows as equal blocks (train_many's layout): the layers that every block's adapter
    targets run the block GEMMs (no per-row slots built), and outputs and gradients equal the
    reference's."""
    ref, fst = pair(seed)
    rows = [name for name in order[:k] for _ in range(n)]
    ids = torch.randint(0, TINY_GPT["vocab_size"], (len(rows), 6), generator=torch.Generator().manual_seed(seed))
    q = dict(multi_lora_modules(fst))["layers.0.attn.q_proj"]  # every adapter targets q_proj

    def took_blocks():
        assert q._blocks(len(rows)) == tuple(order[:k]) and not hasattr(q, "_slot_cache")
    assert_same_outputs_and_gradients(ref, fst, rows, ids, took_blocks)


@pytest.mark.parametrize("bias", [True, False])
def test_the_block_node_has_the_gradients_of_its_plain_ops(bias):
    """BlockLoRA (one node, the adapters' terms added in place) against torch.autograd.gradcheck:
    every input's gradient, the base weight and bias too (train_many keeps them frozen)."""
    from minift.fast.multi_lora import BlockLoRA
    g = torch.Generator().manual_seed(0)
    K, n, T, d_in, d_out, r = 3, 2, 4, 5, 6, 2
    x, w, A, B = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                  for s in ((K * n, T, d_in), (d_out, d_in), (K, r, d_in), (K, d_out, r)))
    b = torch.randn(d_out, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(BlockLoRA.apply, (x, w, b, A, B))
    plain = torch.nn.functional.linear(x, w, b) + torch.bmm(torch.bmm(
        x.reshape(K, -1, d_in), A.transpose(1, 2)), B.transpose(1, 2)).view(K * n, T, d_out)
    torch.testing.assert_close(BlockLoRA.apply(x, w, b, A, B), plain)


def test_the_block_node_under_cpu_autocast_matches_its_plain_ops():
    """Under bf16 autocast every matmul of the node runs in bf16, as autocast runs the plain ops:
    output and gradients agree to bf16's precision."""
    from minift.fast.multi_lora import BlockLoRA
    g = torch.Generator().manual_seed(1)
    K, n, T, d_in, d_out, r = 2, 2, 8, 16, 12, 4
    shapes = ((K * n, T, d_in), (d_out, d_in), (d_out,), (K, r, d_in), (K, d_out, r))
    results = []
    for node in (True, False):
        x, w, b, A, B = (torch.randn(*s, generator=torch.Generator().manual_seed(i)).requires_grad_()
                         for i, s in enumerate(shapes))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = BlockLoRA.apply(x, w, b, A, B) if node else torch.nn.functional.linear(x, w, b) + torch.bmm(
                torch.bmm(x.reshape(K, -1, d_in), A.transpose(1, 2)), B.transpose(1, 2)).view(K * n, T, d_out)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        results.append([y.float()] + [t.grad for t in (x, w, b, A, B)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_only_equal_runs_of_distinct_adapters_are_blocks_and_the_batch_must_have_their_rows():
    from minift.fast.multi_lora import blocks
    assert blocks(["a", "a", "b", "b"]) == ("a", "b")
    assert blocks(["b", "a"]) == ("b", "a")
    assert blocks(["a", "b", "b"]) is None      # unequal runs
    assert blocks(["a", "b", "a", "b"]) is None  # an adapter in two runs
    assert blocks(["a", None]) is None           # a row of the base alone
    ref, fst = pair()
    layer = dict(multi_lora_modules(fst))["layers.0.attn.v_proj"]  # c does not target v_proj
    with mixed_batch(fst, ["a", "c"]):
        assert layer._blocks(2) is None
    two = torch.randint(0, TINY_GPT["vocab_size"], (2, 5))
    for m in (ref, fst):  # names for 4 rows, a batch of 2: an error on both paths, never a silent guess
        with torch.no_grad(), mixed_batch(m, ["a", "a", "b", "b"]), pytest.raises(IndexError):
            m(two)
    layer.dropout["a"] = torch.nn.Dropout(0.5)
    with mixed_batch(fst, ["a", "b"]):
        layer.train()
        assert layer._blocks(2) is None  # dropout while training: the reference draws its masks
        layer.eval()
        assert layer._blocks(2) == ("a", "b")
