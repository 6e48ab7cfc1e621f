"""Each known fault of the first public NTK-Attention code has a test showing it does not occur.

Faults covered: in-place masking that breaks autograd, overflow/underflow at large logits,
a large masked logit wiping out visible ones, a dead gradient of k at zero init, dropout left on
at evaluation, padding ignored, and a misspelt keyword accepted silently.
"""

import pytest
import torch

from ntkattn import NTKConfig, NTKParams
from ntkattn.attention import build_feature_map, ntk_attention_fast, ntk_attention_reference

torch.set_num_threads(1)

HEADS, HEAD_DIM, LENGTH = 2, 8, 9


def leaf(*shape, seed, dtype=torch.float32, scale=1.0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return x.to(dtype).requires_grad_()


def initialised_params(cfg=None):
    cfg = cfg or NTKConfig(s=4)
    params = NTKParams(cfg, HEADS, HEAD_DIM)
    with torch.no_grad():  # move away from the step-0 init so every term is non-zero
        for parameter in params.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
    return params


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_two_layers_backward_with_causal_mask(impl):
    """Masking is never done in place on tensors autograd needs, so stacked layers train."""
    params = initialised_params(NTKConfig(s=4, impl=impl))
    x = leaf(1, HEADS, LENGTH, HEAD_DIM, seed=0)
    hidden = params.attention(x, x, x, is_causal=True)
    hidden = params.attention(hidden * 1.5, hidden, hidden, is_causal=True)
    hidden.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logit, use_k",
    [(100.0, True), (-100.0, True), (1000.0, True), (-1000.0, True), (100.0, False), (1000.0, False)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_stay_finite(logit, dtype, use_k):
    """Logits of +-100 and +-1000 neither overflow nor underflow, in fp32 and bf16.

    Without k and with very negative logits the exact output O + N / S itself overflows
    (S = e^-1000), so that case is covered with Z = 0 in the next test.
    """
    params = initialised_params(NTKConfig(s=4, use_k=use_k))
    q = torch.full((1, HEADS, LENGTH, HEAD_DIM), 1.0)
    k = leaf(1, HEADS, LENGTH, HEAD_DIM, seed=1).detach().abs()
    # Rescale keys so every row's own score is exactly `logit` and the others are close to it.
    k = k / (k.sum(-1, keepdim=True) * HEAD_DIM**-0.5) * logit
    v = leaf(1, HEADS, LENGTH, HEAD_DIM, seed=2).detach()
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))

    out = params.attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    for tensor in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(tensor.float()).all()

    expected = ntk_attention_reference(
        q.detach().double(), k.detach().double(), v.detach().double(), params.feature_map.double(),
        tuple(z.detach().double() for z in params.z_tensors()),
        None if params.k_vector() is None else params.k_vector().detach().double(), is_causal=True,
    )
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_k_very_negative_logits_give_softmax(dtype):
    """Without k and with Z = 0, logits near -1000 still give the plain softmax output."""
    fmap = build_feature_map("elu", HEAD_DIM, HEAD_DIM, seed=0)
    q = torch.full((1, HEADS, LENGTH, HEAD_DIM), 1.0)
    k = leaf(1, HEADS, LENGTH, HEAD_DIM, seed=1).detach().abs()
    k = -k / (k.sum(-1, keepdim=True) * HEAD_DIM**-0.5) * 1000.0
    v = leaf(1, HEADS, LENGTH, HEAD_DIM, seed=2).detach()
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = ntk_attention_fast(q, k, v, fmap, torch.zeros(HEADS, HEAD_DIM, HEAD_DIM), None, is_causal=True)
    # Logits near -1000 carry an fp32 rounding error of ~6e-5 already, hence the tolerance.
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    tolerance = 2e-4 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("function", [ntk_attention_fast, ntk_attention_reference])
def test_masked_huge_logit_keeps_visible_weights(function):
    """A future key with logit ~1e4 under the causal mask leaves earlier rows unchanged."""
    fmap = build_feature_map("elu", HEAD_DIM, HEAD_DIM, seed=0)
    z, k_ntk = leaf(HEADS, HEAD_DIM, HEAD_DIM, seed=3), leaf(HEADS, HEAD_DIM, seed=4).abs()
    q, k, v = (leaf(1, HEADS, LENGTH, HEAD_DIM, seed=s).detach() for s in (5, 6, 7))
    spiked = k.clone()
    spiked[:, :, -1] = q[:, :, 0] * 1e4  # only the last row may see this key
    clean = function(q, k, v, fmap, z, k_ntk, is_causal=True)
    spike = function(q, spiked, v, fmap, z, k_ntk, is_causal=True)
    torch.testing.assert_close(spike[:, :, :-1], clean[:, :, :-1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("feature_map", ["elu", "taylor", "random"])
@pytest.mark.parametrize("z_rank", ["low", "full"])
def test_every_tensor_gets_gradient_at_init(feature_map, z_rank):
    """k (and both Z factors) start at an exact zero contribution yet receive gradient."""
    params = NTKParams(NTKConfig(feature_map=feature_map, r=16 if feature_map == "random" else None, s=4, z_rank=z_rank),
                       HEADS, HEAD_DIM)
    q, k, v = (leaf(1, HEADS, LENGTH, HEAD_DIM, seed=s) for s in (0, 1, 2))
    out = params.attention(q, k, v, is_causal=True)
    (out * leaf(*out.shape, seed=9).detach()).sum().backward()
    for name, parameter in params.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, f"{name} has a zero gradient at init"


def test_phi_dropout_off_in_eval():
    """phi(q) dropout is a child module created once, so eval() turns it off."""
    params = initialised_params(NTKConfig(s=4, dropout=0.5))
    assert isinstance(params.phi_dropout, torch.nn.Dropout)
    q, k, v = (leaf(1, HEADS, LENGTH, HEAD_DIM, seed=s).detach() for s in (0, 1, 2))

    params.eval()
    first, second = params.attention(q, k, v, is_causal=True), params.attention(q, k, v, is_causal=True)
    assert torch.equal(first, second)

    params.train()
    torch.manual_seed(0)
    assert not torch.allclose(params.attention(q, k, v, is_causal=True), first)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_padding_keys_are_ignored(impl, mask_kind):
    """Changing padded keys and values does not change the outputs of real rows."""
    params = initialised_params(NTKConfig(s=4, impl=impl))
    q, k, v = (leaf(2, HEADS, LENGTH, HEAD_DIM, seed=s).detach() for s in (0, 1, 2))
    visible = torch.ones(2, 1, LENGTH, LENGTH, dtype=torch.bool).tril()
    visible[1, :, :, :3] = False  # three left-padding tokens in batch 1
    mask = visible if mask_kind == "bool" else torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :3] = 50.0
    v2[1, :, :3] = -7.0
    out = params.attention(q, k, v, attention_mask=mask)
    out2 = params.attention(q, k2, v2, attention_mask=mask)
    torch.testing.assert_close(out2[:, :, 3:], out[:, :, 3:], atol=0, rtol=0)


def test_fully_masked_row_is_zero_and_finite():
    """A query that sees no real key and has no prefix mass gets 0 and finite gradients."""
    fmap = build_feature_map("elu", HEAD_DIM, HEAD_DIM, seed=0)
    q, k, v = (leaf(1, HEADS, LENGTH, HEAD_DIM, seed=s) for s in (0, 1, 2))
    z = leaf(HEADS, HEAD_DIM, HEAD_DIM, seed=3)
    mask = torch.ones(1, 1, LENGTH, LENGTH, dtype=torch.bool)
    mask[..., 0, :] = False
    out = ntk_attention_fast(q, k, v, fmap, z, None, attention_mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, z))


def test_misspelt_keyword_is_rejected():
    """A misspelt option (casual_mask) raises instead of being ignored."""
    params = NTKParams(NTKConfig(s=4), HEADS, HEAD_DIM)
    q = torch.randn(1, HEADS, LENGTH, HEAD_DIM)
    with pytest.raises(TypeError):
        params.attention(q, q, q, casual_mask=True)
    with pytest.raises(TypeError):
        ntk_attention_fast(q, q, q, params.feature_map, params.z_tensors(), None, casual_mask=True)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"feature_map": "relu"}, "feature_map"),
        ({"r": 0}, "r"),
        ({"s": 0}, "s"),
        ({"z_rank": "mid"}, "z_rank"),
        ({"dropout": 1.0}, "dropout"),
        ({"init_std": -1.0}, "init_std"),
        ({"impl": "cuda"}, "impl"),
        ({"use_k": 1}, "use_k"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=f"NTKConfig.{field}"):
        NTKConfig(**kwargs)


def test_config_checks_width_and_rank_against_head_dim():
    with pytest.raises(ValueError, match="NTKConfig.r=9"):
        NTKConfig(feature_map="elu", r=9).resolve_width(8)
    with pytest.raises(ValueError, match="NTKConfig.s=9"):
        NTKConfig(feature_map="taylor", s=9).resolve_width(8)
    assert NTKConfig(feature_map="taylor").resolve_width(8) == 9
    assert NTKConfig(feature_map="random", r=32).resolve_width(8) == 32
