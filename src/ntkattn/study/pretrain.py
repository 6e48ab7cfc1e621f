"""Pretrain a small base model inside prepare-model, for studies that need a model no package ships.

  pretrain-llama  A LlamaConfig of the `model.tiny` shape (all-MiniLM-L6-v2 tokenizer), trained by
                  next-token prediction on the training articles of the gensim Wikipedia dump.
  pretrain-vit    A ViTConfig of the `model.tiny` shape, trained to classify Fashion-MNIST. The
                  classifier is dropped and the backbone (ViTModel) is saved.

`model.pretrain` sets steps, batch_size, lr, block_size and max_articles (text), max_images (vision)
and threads.
The result is a real but tiny model trained for minutes on CPU, not a released checkpoint:
base_model.json says so in `note`, `pretrained_in_pipeline` and `pretrain` (settings and scores).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# The causal_lm tasks of the presets that use pretrain-llama hold out these fractions of articles
# (split seed 0). Pretraining reads only the remaining training articles, so it sees no test
# article as long as the task keeps the same split_fractions.
WIKI_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}
# max_articles None: every article of the dump (a limit changes which articles are held out).
DEFAULTS = {"steps": 300, "batch_size": 16, "lr": 3e-3, "block_size": 128, "max_images": 10000, "max_articles": None,
            "threads": 0}
WARMUP_FRACTION = 0.05


def _settings(model_cfg) -> dict:
    given = dict(getattr(model_cfg, "pretrain", None) or {})
    return {**DEFAULTS, **given}


def _optimizer(model, settings):
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    warmup = max(1, int(WARMUP_FRACTION * settings["steps"]))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings["steps"] - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(model, settings, draw_batch, loss_fn) -> list[float]:
    """Run the pretraining loop; return the mean loss of each tenth of the steps."""
    optimizer, scheduler = _optimizer(model, settings)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(settings["steps"]):
        loss = loss_fn(model, draw_batch(gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tenth = max(1, len(losses) // 10)
    return [round(sum(losses[i: i + tenth]) / len(losses[i: i + tenth]), 4) for i in range(0, len(losses), tenth)]


def _wiki_streams(tokenizer, max_articles: int | None) -> dict[str, torch.Tensor]:
    from ntkattn.study import assets
    from ntkattn.study.data import read_wiki_articles, split_by_fraction

    articles = read_wiki_articles(assets.gensim_wiki_dump(), limit=max_articles)
    indices = split_by_fraction(len(articles), WIKI_SPLIT_FRACTIONS)
    streams = {}
    for name in ("train", "validation"):
        ids = tokenizer([articles[i][1] for i in indices[name]], add_special_tokens=False)["input_ids"]
        streams[name] = torch.tensor([t for row in ids for t in row + [tokenizer.eos_token_id]], dtype=torch.long)
    return streams


def _pretrain_llama(model, tokenizer, settings) -> dict:
    tokenizer.model_max_length = 1 << 30  # whole articles are tokenised, then cut into blocks
    streams = _wiki_streams(tokenizer, settings["max_articles"])
    block, train = settings["block_size"], streams["train"]

    def draw(gen):
        starts = torch.randint(0, train.numel() - block - 1, (settings["batch_size"],), generator=gen)
        return torch.stack([train[s: s + block] for s in starts.tolist()])  # [B, block]

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    curve = _train(model, settings, draw, loss_fn)
    model.eval()
    val = streams["validation"][: 32 * block]
    with torch.no_grad():
        blocks = val[: val.numel() // block * block].view(-1, block)  # [N, block]
        val_loss = sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)
    return {"data": "gensim Wikipedia dump, training articles (split_fractions validation 0.1, test 0.1, seed 0)",
            "train_tokens": int(train.numel()), "loss_curve": curve,
            "validation_perplexity": round(math.exp(val_loss), 2), "validation_tokens": int(blocks.numel())}


def _fashion_tensors(split: str, limit: int, processor, image_size: int):
    from ntkattn.study.data_vision import read_fashion_mnist

    images, labels = read_fashion_mnist(split)
    x = torch.from_numpy(images[:limit].copy()).float().div(255)[:, None]  # [N, 1, 28, 28]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(labels[:limit].astype("int64"))  # [N, 3, S, S], [N]


def _pretrain_vit(backbone, processor, settings):
    import transformers

    config = backbone.config
    config.num_labels = 10
    classifier = transformers.ViTForImageClassification(config)
    classifier.vit.load_state_dict(backbone.state_dict())
    x, y = _fashion_tensors("train", settings["max_images"], processor, config.image_size)

    def draw(gen):
        rows = torch.randint(0, len(y), (settings["batch_size"],), generator=gen)
        return x[rows], y[rows]

    def loss_fn(m, batch):
        return F.cross_entropy(m(pixel_values=batch[0]).logits, batch[1])

    curve = _train(classifier, settings, draw, loss_fn)
    classifier.eval()
    test_x, test_y = _fashion_tensors("t10k", 2000, processor, config.image_size)
    with torch.no_grad():
        predictions = torch.cat([classifier(pixel_values=test_x[i: i + 256]).logits.argmax(-1) for i in range(0, len(test_y), 256)])
    stats = {"data": f"Fashion-MNIST (Debian dataset-fashion-mnist), first {len(y)} training images, resized to "
                     f"{config.image_size}x{config.image_size} RGB", "loss_curve": curve,
             "test_accuracy_fashion_mnist": round(float((predictions == test_y).float().mean()), 4),
             "test_images": len(test_y)}
    return classifier.vit, stats


def pretrain_model(model_cfg, from_random):
    """Return (model, tokenizer or processor, note, extra) for source pretrain-llama / pretrain-vit.

    `from_random(cfg)` is base_model's random-weight builder; it gives the seeded starting point.
    """
    settings = _settings(model_cfg)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    architecture = model_cfg.source.split("-", 1)[1]
    start_cfg = SimpleNamespace(**{**_plain(model_cfg), "source": f"random-{architecture}"})
    model, preprocessor, _, extra = from_random(start_cfg)

    started = time.perf_counter()
    if architecture == "llama":
        stats = _pretrain_llama(model, preprocessor, settings)
        what = f"next-token prediction on {stats['train_tokens']:,} Wikipedia tokens"
    else:
        model, stats = _pretrain_vit(model, preprocessor, settings)
        what = "Fashion-MNIST classification (classifier dropped)"
    unused = ("max_images",) if architecture == "llama" else ("block_size", "max_articles")
    stats.update(settings={k: v for k, v in settings.items() if k not in unused}, seconds=round(time.perf_counter() - started, 1))
    parameters = sum(p.numel() for p in model.parameters())
    note = (f"PRETRAINED INSIDE THIS PIPELINE, not a released checkpoint: a {parameters / 1e6:.1f}M-parameter "
            f"{architecture} model trained from random weights for {settings['steps']} steps of {what}")
    return model, preprocessor, note, {**extra, "pretrained_in_pipeline": True, "pretrain": stats}


def _plain(model_cfg) -> dict:
    if hasattr(model_cfg, "to_dict"):
        return model_cfg.to_dict()
    return dict(vars(model_cfg))
