"""Fast NTK-Attention against the reference formula: outputs and gradients at fixed seeds."""

import pytest
import torch
import torch.nn.functional as F

from ntkattn.attention import build_feature_map, ntk_attention_fast, ntk_attention_reference

torch.set_num_threads(1)

HEAD_DIM = 8
WIDTHS = {"elu": HEAD_DIM, "taylor": HEAD_DIM + 1, "random": 16}


def make_case(feature_map, z_rank, use_k, lq, lk, heads=4, kv_heads=2, batch=2, dtype=torch.float32, seed=0):
    """Return (inputs, feature map) with every tensor a leaf that requires grad."""
    generator = torch.Generator().manual_seed(seed)
    width = WIDTHS[feature_map]

    def leaf(*shape, positive=False):
        x = torch.randn(*shape, generator=generator)
        x = x.abs() if positive else x
        return x.to(dtype).requires_grad_()

    q = leaf(batch, heads, lq, HEAD_DIM)
    k = leaf(batch, kv_heads, lk, HEAD_DIM)
    v = leaf(batch, kv_heads, lk, HEAD_DIM)
    if z_rank == "low":
        z = (leaf(heads, width, 3), leaf(heads, 3, HEAD_DIM))
    else:
        z = leaf(heads, width, HEAD_DIM)
    k_ntk = leaf(heads, width, positive=True) if use_k else None
    fmap = build_feature_map(feature_map, HEAD_DIM, width, seed=3)
    return (q, k, v, z, k_ntk), fmap


def padding_mask(batch, lq, lk, kind, causal=True):
    """Left-padding mask (first key of batch 1 is padding), lower-right causal when lq < lk."""
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        visible = visible.tril(diagonal=lk - lq)
    visible = visible.expand(batch, 1, lq, lk).clone()
    visible[1, :, :, 0] = False
    if kind == "bool":
        return visible
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)


def run(function, inputs, fmap, rows=slice(None), **kwargs):
    """Return (output, gradients of every input) for a fixed random upstream gradient."""
    q, k, v, z, k_ntk = inputs
    out = function(q, k, v, fmap, z, k_ntk, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    leaves = [q, k, v, *(z if isinstance(z, tuple) else (z,))] + ([k_ntk] if k_ntk is not None else [])
    grads = torch.autograd.grad((out[:, :, rows] * upstream[:, :, rows]).float().sum(), leaves)
    return out, grads


def assert_parity(inputs, fmap, atol, rtol, **kwargs):
    out_ref, grads_ref = run(ntk_attention_reference, inputs, fmap, **kwargs)
    out_fast, grads_fast = run(ntk_attention_fast, inputs, fmap, **kwargs)
    torch.testing.assert_close(out_fast.float(), out_ref.float(), atol=atol, rtol=rtol)
    names = ["q", "k", "v", "z", "z_b", "k_ntk"]
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref):
        torch.testing.assert_close(g_fast.float(), g_ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("feature_map", ["elu", "taylor", "random"])
@pytest.mark.parametrize("z_rank", ["low", "full"])
@pytest.mark.parametrize("use_k", [True, False])
@pytest.mark.parametrize("length", [7, 33])
@pytest.mark.parametrize("mode", ["causal", "bidirectional", "bool_padding", "float_padding"])
def test_parity_float32(feature_map, z_rank, use_k, length, mode):
    inputs, fmap = make_case(feature_map, z_rank, use_k, length, length)
    kwargs = {"is_causal": mode == "causal"}
    if mode.endswith("padding"):
        # Bool: causal with left padding, so row 0 of batch 1 sees no key at all and both
        # implementations return 0 there. Float: bidirectional padding (BERT-like); with an
        # additive mask and no k, a row with no visible key has no defined output.
        kind = mode.split("_")[0]
        kwargs["attention_mask"] = padding_mask(2, length, length, kind, causal=kind == "bool")
    assert_parity(inputs, fmap, atol=2e-5, rtol=2e-5, **kwargs)


@pytest.mark.parametrize("lq, lk", [(1, 9), (3, 10)])
@pytest.mark.parametrize("use_k", [True, False])
def test_parity_kv_cache_shapes(lq, lk, use_k):
    """Decoding with a cache: fewer queries than keys, no mask for one query, a mask otherwise."""
    inputs, fmap = make_case("elu", "low", use_k, lq, lk)
    mask = None if lq == 1 else padding_mask(2, lq, lk, "bool")
    assert_parity(inputs, fmap, atol=2e-5, rtol=2e-5, attention_mask=mask)


@pytest.mark.parametrize("mode", ["causal", "bool_padding"])
@pytest.mark.parametrize("use_k", [True, False])
def test_parity_bfloat16(mode, use_k):
    """bf16 fast path against the reference run on the same bf16 values in float32."""
    inputs16, fmap = make_case("elu", "low", use_k, 33, 33, dtype=torch.bfloat16)
    inputs32 = [None if t is None else (tuple(x.detach().float() for x in t) if isinstance(t, tuple) else t.detach().float())
                for t in inputs16]
    kwargs = {"is_causal": mode == "causal"}
    if mode != "causal":
        kwargs["attention_mask"] = padding_mask(2, 33, 33, "bool")
    out_fast, grads_fast = run(ntk_attention_fast, inputs16, fmap, **kwargs)
    q, k, v, z, k_ntk = inputs32
    out_ref = ntk_attention_reference(q, k, v, fmap, z, k_ntk, **kwargs)
    torch.testing.assert_close(out_fast.float(), out_ref, atol=3e-2, rtol=3e-2)
    for grad in grads_fast:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("function", [ntk_attention_fast, ntk_attention_reference])
@pytest.mark.parametrize("causal", [True, False])
def test_zero_prefix_equals_softmax(function, causal):
    """With Z = 0 and k = 0 the output is plain softmax attention."""
    (q, k, v, z, k_ntk), fmap = make_case("elu", "full", True, 33, 33)
    zeros_z, zeros_k = torch.zeros_like(z), torch.zeros_like(k_ntk)
    out = function(q, k, v, fmap, zeros_z, zeros_k, is_causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("feature_map", ["elu", "taylor", "random"])
@pytest.mark.parametrize("function", [ntk_attention_fast, ntk_attention_reference])
def test_explicit_prefix_identity(feature_map, function):
    """k = sum phi(p_i) and Z = sum phi(p_i) v_i^T reproduce a prefix scored by phi(q).phi(p)."""
    torch.manual_seed(0)
    batch, heads, length, prefix = 1, 2, 7, 5
    width = WIDTHS[feature_map]
    fmap = build_feature_map(feature_map, HEAD_DIM, width, seed=1).double()
    q, k, v = (torch.randn(batch, heads, length, HEAD_DIM, dtype=torch.float64) for _ in range(3))
    # Small prefix keys keep the Taylor kernel 1 + q.p / sqrt(d) positive, as the identity needs.
    prefix_k = 0.3 * torch.randn(heads, prefix, HEAD_DIM, dtype=torch.float64)
    prefix_v = torch.randn(heads, prefix, HEAD_DIM, dtype=torch.float64)
    phi_p = fmap(prefix_k)  # [H, m, r]
    k_ntk = phi_p.sum(1)  # [H, r]
    z = phi_p.transpose(1, 2) @ prefix_v  # [H, r, d]

    out = function(q, k, v, fmap, z, k_ntk, is_causal=True)

    scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    real_weights = scores.exp().masked_fill(~causal, 0.0)  # [B, H, L, L]
    prefix_weights = fmap(q) @ phi_p.transpose(1, 2).unsqueeze(0)  # [B, H, L, m]
    if feature_map == "taylor":
        assert (prefix_weights.sum(-1) > 0).all(), "the identity needs a positive prefix mass"
    expected = (real_weights @ v + prefix_weights @ prefix_v) / (real_weights.sum(-1) + prefix_weights.sum(-1)).unsqueeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def test_random_features_approximate_exp_kernel():
    """E[phi(q).phi(p)] = exp(q.p / sqrt(d)); with r = 8192 the estimate is within 10%."""
    fmap = build_feature_map("random", HEAD_DIM, 8192, seed=0).double()
    torch.manual_seed(1)
    q, p = torch.randn(4, HEAD_DIM, dtype=torch.float64) * 0.5, torch.randn(4, HEAD_DIM, dtype=torch.float64) * 0.5
    estimate = (fmap(q) * fmap(p)).sum(-1)
    exact = torch.exp((q * p).sum(-1) / HEAD_DIM**0.5)
    assert ((estimate - exact).abs() / exact).max() < 0.1
