"""Hand-written backward passes of the fast path: gradcheck in float64, saved memory, fallback.

The fast path on CPU runs two custom autograd functions (the prefix terms recomputed in
backward, and the flash-attention combination) and the elu feature map has its own backward.
gradcheck compares each analytic gradient with finite differences.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from ntkattn.attention import build_feature_map, flash_cpu, ntk_attention_fast, ntk_attention_reference
from ntkattn.attention.feature_maps import _EluPlusOne

torch.set_num_threads(1)

HEAD_DIM = 4
WIDTHS = {"elu": HEAD_DIM, "taylor": HEAD_DIM + 1, "random": 6}


def double_case(feature_map="elu", z_rank="low", use_k=True, lq=5, lk=5, heads=2, kv_heads=2, seed=0):
    """Return float64 leaves (q, k, v, *z, k_ntk?) and the feature map, away from kinks."""
    generator = torch.Generator().manual_seed(seed)
    width = WIDTHS[feature_map]

    def leaf(*shape, scale=1.0, offset=0.0):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
        return x.requires_grad_()

    q = leaf(2, heads, lq, HEAD_DIM, scale=0.5)
    k = leaf(2, kv_heads, lk, HEAD_DIM, scale=0.5)
    v = leaf(2, kv_heads, lk, HEAD_DIM)
    z = [leaf(heads, width, 2), leaf(heads, 2, HEAD_DIM)] if z_rank == "low" else [leaf(heads, width, HEAD_DIM)]
    # Positive k and features near 1 keep P = phi.k far from its clamp at 0.
    tensors = [q, k, v, *z] + ([leaf(heads, width, scale=0.1, offset=0.5)] if use_k else [])
    fmap = build_feature_map(feature_map, HEAD_DIM, width, seed=2).double()
    return tensors, fmap


def fast_function(fmap, z_rank, use_k, **kwargs):
    """Wrap ntk_attention_fast as a function of flat tensors, for gradcheck."""
    def function(q, k, v, *rest):
        z = tuple(rest[:2]) if z_rank == "low" else rest[0]
        k_ntk = rest[-1] if use_k else None
        return ntk_attention_fast(q, k, v, fmap, z, k_ntk, **kwargs)

    return function


def bool_mask(lq, lk, empty_row=False):
    visible = torch.ones(2, 1, lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    visible[1, :, :, 0] = False
    if empty_row:
        visible[1, :, 0] = False  # row 0 of batch 1 has no visible key
    return visible


@pytest.mark.parametrize("feature_map", ["elu", "taylor", "random"])
@pytest.mark.parametrize("z_rank", ["low", "full"])
@pytest.mark.parametrize("use_k", [True, False])
def test_fast_gradcheck_causal(feature_map, z_rank, use_k):
    tensors, fmap = double_case(feature_map, z_rank, use_k)
    assert flash_cpu.available(tensors[0], None, dropout_active=False)
    assert torch.autograd.gradcheck(fast_function(fmap, z_rank, use_k, is_causal=True), tensors)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_empty_row"])
@pytest.mark.parametrize("use_k", [True, False])
def test_fast_gradcheck_masks(mask_kind, use_k):
    tensors, fmap = double_case(use_k=use_k, lq=3, lk=6)
    mask = bool_mask(3, 6, empty_row=mask_kind == "bool_empty_row")
    if mask_kind == "float":
        mask = torch.where(mask, 0.0, float("-inf")).double()
    assert torch.autograd.gradcheck(fast_function(fmap, "low", use_k, attention_mask=mask), tensors)


def test_fast_gradcheck_grouped_query_bidirectional():
    tensors, fmap = double_case(heads=4, kv_heads=2)
    assert torch.autograd.gradcheck(fast_function(fmap, "low", True), tensors)


def test_fast_gradcheck_large_logits():
    """Logits near 60 put the row shift on the real keys, and k the prefix mass in between."""
    tensors, fmap = double_case()
    with torch.no_grad():
        tensors[0].mul_(30.0)
        tensors[1].copy_(tensors[0][:, :, :5].abs().sign() * 2.0)
    assert torch.autograd.gradcheck(fast_function(fmap, "low", True, is_causal=True), tensors)


@pytest.mark.parametrize("feature_map", ["elu", "taylor", "random"])
def test_scaled_features_backward_matches_autograd(feature_map):
    fmap = build_feature_map(feature_map, HEAD_DIM, WIDTHS[feature_map], seed=1).double()
    x = torch.randn(2, 3, 7, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    phi, _ = fmap.scaled_features(x)
    grad_phi = torch.randn(phi.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(phi, x, grad_phi)
    closed_form = fmap.scaled_features_backward(x.detach(), phi.detach().clone(), grad_phi.clone())
    torch.testing.assert_close(closed_form, expected, atol=1e-12, rtol=1e-12)


def test_elu_features_equal_plain_elu():
    x = torch.randn(3, 5, 8)
    assert torch.equal(_EluPlusOne.apply(x, 8**-0.25), F.elu(x * 8**-0.25) + 1.0)


def test_elu_features_gradcheck():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _EluPlusOne.apply(t, 8**-0.25), (x,))


def saved_bytes(function):
    """Run function() and return the bytes of distinct storages autograd saved for backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


@pytest.mark.parametrize("feature_map", ["elu", "random"])
def test_fast_saved_memory_near_sdpa(feature_map):
    """Between forward and backward the fast path keeps what SDPA keeps, plus per-row numbers."""
    batch, heads, length, width = 1, 4, 256, 64
    q, k, v = (torch.randn(batch, heads, length, 64, requires_grad=True) for _ in range(3))
    fmap = build_feature_map(feature_map, 64, width, seed=0)
    z = (torch.randn(heads, width, 8, requires_grad=True), torch.randn(heads, 8, 64, requires_grad=True))
    k_ntk = torch.rand(heads, width, requires_grad=True)

    baseline = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    ntk = saved_bytes(lambda: ntk_attention_fast(q, k, v, fmap, z, k_ntk, is_causal=True))
    parameters = sum(t.numel() * 4 for t in (*z, k_ntk))
    rows = 2 * batch * heads * length * 4  # beta and the adjusted log-sum-exp
    assert ntk <= baseline + parameters + rows


@pytest.mark.parametrize("use_k", [True, False])
@pytest.mark.parametrize("mode", ["causal", "bool_padding", "kv_cache"])
def test_virtual_key_fallback_parity(monkeypatch, use_k, mode):
    """The path used off CPU or with attention dropout still matches the reference."""
    monkeypatch.setattr(flash_cpu, "available", lambda *args, **kwargs: False)
    lq, lk = (3, 6) if mode == "kv_cache" else (5, 5)
    tensors, fmap = double_case(use_k=use_k, lq=lq, lk=lk, heads=4, kv_heads=2)
    kwargs = {"is_causal": True} if mode == "causal" else {"attention_mask": bool_mask(lq, lk)}
    q, k, v, z_a, z_b, *rest = tensors
    k_ntk = rest[0] if use_k else None

    outputs = [function(q, k, v, fmap, (z_a, z_b), k_ntk, **kwargs) for function in (ntk_attention_fast, ntk_attention_reference)]
    upstream = torch.randn(outputs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = [torch.autograd.grad((out * upstream).sum(), tensors) for out in outputs]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-10, rtol=1e-10)
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference, atol=1e-10, rtol=1e-10)
