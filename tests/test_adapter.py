"""Adapter files: bit-exact reload, random-feature buffers, and clear errors for bad files."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from ntkattn import NTKConfig, inject_ntk, load_adapter, ntk_parameters, save_adapter

torch.set_num_threads(1)


def tiny_llama(heads=4, cls=LlamaForCausalLM, **extra):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return cls(config).eval()


def trained(model, seed=3):
    """Perturb NTK params so a reload that silently kept the init would be caught."""
    with torch.no_grad():
        for parameter in ntk_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    return model


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", [NTKConfig(s=4), NTKConfig(feature_map="random", r=16, s=3, z_rank="full")],
                         ids=["elu-low", "random-full"])
@pytest.mark.parametrize("target_injected", [True, False])
def test_reload_is_bit_exact(tmp_path, cfg, target_injected):
    base = tiny_llama()
    model = trained(inject_ntk(copy.deepcopy(base), cfg))
    path = save_adapter(model, tmp_path / "adapter.safetensors")

    target = inject_ntk(copy.deepcopy(base), cfg) if target_injected else copy.deepcopy(base)
    if target_injected:
        # Overwrite the target's buffers so the reload must restore them from the file.
        with torch.no_grad():
            for name, buffer in target.named_buffers():
                if name.endswith("feature_map.projection"):
                    buffer.normal_()
    load_adapter(target, path)
    with torch.no_grad():
        assert torch.equal(target(IDS).logits, model(IDS).logits)


def test_file_stores_config_and_random_projection(tmp_path):
    cfg = NTKConfig(feature_map="random", r=16, s=3, seed=11)
    model = inject_ntk(tiny_llama(), cfg)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["ntk_config"]) == cfg.to_dict()
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.ntk.feature_map.projection" in keys
    assert "model.layers.1.self_attn.ntk.k_raw" in keys


def test_extra_trainable_is_saved_and_loaded(tmp_path):
    base = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)
    model = trained(inject_ntk(copy.deepcopy(base), NTKConfig(s=4), extra_trainable=("score",)))
    with torch.no_grad():
        model.score.weight.add_(1.0)
    path = save_adapter(model, tmp_path / "a.safetensors", extra_trainable=("score",))
    target = load_adapter(copy.deepcopy(base), path)
    assert torch.equal(target.score.weight, model.score.weight)
    assert target.score.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(target(IDS).logits, model(IDS).logits)


def test_truncated_file_raises(tmp_path):
    path = save_adapter(trained(inject_ntk(tiny_llama(), NTKConfig(s=4))), tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="failed to read adapter file"):
        load_adapter(tiny_llama(), path)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="failed to read adapter file"):
        load_adapter(tiny_llama(), path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_llama(), tmp_path / "none.safetensors")


def test_mismatched_model_raises(tmp_path):
    path = save_adapter(inject_ntk(tiny_llama(), NTKConfig(s=4)), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="attention modules"):
        load_adapter(tiny_llama(heads=8), path)


def test_mismatched_config_raises(tmp_path):
    path = save_adapter(inject_ntk(tiny_llama(), NTKConfig(s=4)), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="differs from the model's injected config"):
        load_adapter(inject_ntk(tiny_llama(), NTKConfig(s=2)), path)
