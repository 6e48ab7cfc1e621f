"""Injection into tiny random transformers models: identity at step 0, generation, gradients."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, ViTConfig, ViTModel

from ntkattn import NTKConfig, count_ntk_parameters, inject_ntk, mark_only_ntk_trainable, ntk_parameters
from ntkattn.attention.fast import numerator_prefix
from ntkattn.inject import find_ntk_modules

torch.set_num_threads(1)

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS


def tiny_llama(cls=LlamaForCausalLM, **extra):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, **extra)
    return cls(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=64)
    return ViTModel(config).eval()


def token_batch():
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


CONFIGS = [
    NTKConfig(s=4),
    NTKConfig(feature_map="taylor", z_rank="full"),
    NTKConfig(feature_map="random", r=16, s=3, use_k=False),
    NTKConfig(s=4, impl="reference"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.feature_map}-{c.z_rank}-k{c.use_k}-{c.impl}")
def test_llama_step0_logits_equal_base(cfg):
    base = tiny_llama()
    model = inject_ntk(copy.deepcopy(base), cfg)
    ids, mask = token_batch()
    with torch.no_grad():
        expected, got = base(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-5, rtol=1e-5)  # padded rows excluded


def test_llama_generate_matches_base_with_and_without_cache():
    base = tiny_llama()
    model = inject_ntk(copy.deepcopy(base), NTKConfig(s=4))
    ids, _ = token_batch()
    prompt = ids[:1, :6]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = base.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, **settings), expected)
    assert torch.equal(model.generate(prompt, use_cache=False, **settings), expected)


def test_llama_generate_same_with_and_without_cache_after_training():
    """With non-zero NTK tensors the KV-cache path (one query, many keys) matches the full pass."""
    model = inject_ntk(tiny_llama(), NTKConfig(s=4))
    with torch.no_grad():
        for parameter in ntk_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    ids, _ = token_batch()
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(ids[:1, :6], **settings)
    assert torch.equal(model.generate(ids[:1, :6], use_cache=False, **settings), with_cache)


def test_llama_low_rank_init_is_exactly_zero():
    model = inject_ntk(tiny_llama(), NTKConfig(s=4))
    phi = torch.rand(2, HEADS, 5, HEAD_DIM)
    for _, params in find_ntk_modules(model):
        assert torch.equal(numerator_prefix(phi, params.z_tensors(), torch.float32), torch.zeros(2, HEADS, 5, HEAD_DIM))
        assert torch.equal(params.k_vector(), torch.zeros(HEADS, HEAD_DIM))


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"{c.feature_map}-{c.z_rank}-k{c.use_k}")
def test_llama_every_ntk_tensor_gets_gradient(cfg):
    model = inject_ntk(tiny_llama(), cfg).train()
    ids, mask = token_batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".ntk." in name}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_llama_training_step_changes_output():
    base = tiny_llama()
    model = inject_ntk(copy.deepcopy(base), NTKConfig(s=4)).train()
    ids, mask = token_batch()
    optimizer = torch.optim.AdamW(ntk_parameters(model), lr=1e-2)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "cfg, per_head",
    [
        (NTKConfig(s=4), HEAD_DIM * 4 + 4 * HEAD_DIM + HEAD_DIM),
        (NTKConfig(s=4, use_k=False), HEAD_DIM * 4 + 4 * HEAD_DIM),
        (NTKConfig(z_rank="full"), HEAD_DIM * HEAD_DIM + HEAD_DIM),
        (NTKConfig(feature_map="taylor", z_rank="full", use_k=False), (HEAD_DIM + 1) * HEAD_DIM),
        (NTKConfig(feature_map="random", r=20, s=2), 20 * 2 + 2 * HEAD_DIM + 20),
    ],
)
def test_parameter_count_formula(cfg, per_head):
    model = inject_ntk(tiny_llama(), cfg)
    assert count_ntk_parameters(model) == per_head * HEADS * LAYERS


def test_inject_twice_raises():
    model = inject_ntk(tiny_llama(), NTKConfig(s=4))
    with pytest.raises(ValueError, match="already has NTK params"):
        inject_ntk(model, NTKConfig(s=4))


def test_extra_trainable_head():
    model = inject_ntk(tiny_llama(LlamaForSequenceClassification, num_labels=3, pad_token_id=0), NTKConfig(s=4))
    mark_only_ntk_trainable(model, extra_trainable=("score",))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert all(".ntk." in name or name == "score.weight" for name in trainable)


def test_module_without_ntk_falls_back_to_sdpa():
    base = tiny_llama()
    model = inject_ntk(copy.deepcopy(base), NTKConfig(s=4))
    with torch.no_grad():
        for parameter in ntk_parameters(model):
            parameter.add_(1.0)
    del model.model.layers[0].self_attn.ntk
    del model.model.layers[1].self_attn.ntk
    ids, _ = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"{c.feature_map}-{c.z_rank}-k{c.use_k}")
def test_bert_step0_equals_base_with_padding(cfg):
    base = tiny_bert()
    model = inject_ntk(copy.deepcopy(base), cfg)
    ids, mask = token_batch()
    mask = mask.flip(-1)  # BERT pads on the right
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :-3], expected[1, :-3], atol=1e-5, rtol=1e-5)
    assert len(find_ntk_modules(model)) == LAYERS


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"{c.feature_map}-{c.z_rank}-k{c.use_k}")
def test_vit_step0_equals_base(cfg):
    base = tiny_vit()
    model = inject_ntk(copy.deepcopy(base), cfg)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, base(pixels).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(find_ntk_modules(model)) == LAYERS
