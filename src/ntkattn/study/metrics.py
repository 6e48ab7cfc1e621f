"""Evaluation metrics over a Hugging Face causal LM, and the confidence interval used in tables.

The model only needs `model(input_ids=..., attention_mask=...)` returning an object with
`.logits` of shape [B, L, V]. Everything here is a pure function of the model's weights: the
model is put in eval mode for the call and its previous mode is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Switch off dropout and gradients for the block, then restore the model's train flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids [B, L], attention_mask [B, L]).

    Right padding keeps every real token at the position it has without padding, so a causal
    model gives the real tokens the same logits whatever else is in the batch.
    """
    if len(sequences) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"sequence {row} of the batch is empty")
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def last_token_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Pick the logits at each row's last real (mask == 1) position: [B, L, V] -> [B, V].

    Works for left and right padding alike because it looks for the last 1 in the mask.
    """
    width = attention_mask.shape[1]
    from_end = torch.flip(attention_mask, dims=[1]).argmax(dim=1)  # [B] distance of last 1 from the end
    last = width - 1 - from_end
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last.to(logits.device)]


def _verbalizer_pair(verbalizer_ids: Mapping[str, int] | Sequence[int]) -> list[int]:
    """Return [no_id, yes_id], so that column index == label (0 = no, 1 = yes)."""
    if isinstance(verbalizer_ids, Mapping):
        return [int(verbalizer_ids["no"]), int(verbalizer_ids["yes"])]
    no_id, yes_id = verbalizer_ids
    return [int(no_id), int(yes_id)]


def yes_no_loss(
    logits_at_last: torch.Tensor,
    labels: torch.Tensor,
    verbalizer_ids: Mapping[str, int] | Sequence[int],
) -> torch.Tensor:
    """Mean two-way cross-entropy over the "no" and "yes" logits only.

    logits_at_last: [B, V] logits at each prompt's last real token. labels: [B], 1 = yes, 0 = no.
    verbalizer_ids: {"no": id, "yes": id} or the pair (no_id, yes_id).
    """
    pair = _verbalizer_pair(verbalizer_ids)
    two_way = logits_at_last[:, pair].float()  # [B, 2]
    return F.cross_entropy(two_way, labels.to(two_way.device).long())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, t] predicts labels[:, t + 1].

    labels: [B, L], usually the input_ids with `ignore_index` at padding.
    """
    predictions = logits[:, :-1].float()  # [B, L-1, V]
    targets = labels[:, 1:].to(predictions.device)  # [B, L-1]
    return F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def perplexity_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Plan the strided windows as (begin, end, score_from) over input positions.

    Input position p predicts token p + 1, so positions run over [0, n_tokens - 1). A window
    feeds positions [begin, end) to the model and scores the predictions of [score_from, end).
    """
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be >= 1, got context={context}, stride={stride}")
    if stride > context:
        raise ValueError(f"stride {stride} > context {context} would leave tokens unscored")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")

    n_positions = n_tokens - 1
    windows = []
    begin, scored_until = 0, 0
    while True:
        end = min(begin + context, n_positions)
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == n_positions:
            return windows
        begin += stride


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    context: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Score a token stream with strided sliding windows and return its perplexity.

    Windows of `context` tokens start every `stride` tokens (stride <= context). The first
    window scores all of its predictions; each later window scores only its last `stride`
    predictions, and its earlier tokens serve as history. So every token of the stream except
    the first is scored exactly once, with all the history its window gives: at least
    context - stride + 1 tokens after the first window. The first token is never scored
    because nothing precedes it. stride == context gives disjoint windows, in which the first
    target of each window is still scored, from one token of history. This differs from the
    Hugging Face strided example, which drops that target. The last window may be shorter
    than `context`.

    token_ids: 1-D LongTensor, the stream (documents joined with EOS by the caller).
    Returns {"nll_sum", "n_tokens", "mean_nll", "perplexity"} where perplexity is
    exp(nll_sum / n_tokens) with natural logarithms and n_tokens = len(token_ids) - 1.
    """
    if token_ids.dim() != 1 or token_ids.dtype not in (torch.long, torch.int, torch.int16):
        raise ValueError(f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} {tuple(token_ids.shape)}")
    windows = perplexity_windows(token_ids.numel(), context, stride)
    device = _model_device(model)
    stream = token_ids.long().cpu()

    nll_sum, n_scored = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with _eval_mode(model):
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            inputs = [stream[begin:end].tolist() for begin, end, _ in batch]
            input_ids, attention_mask = pad_batch(inputs, pad_id=0)  # [B, L]
            targets = torch.zeros_like(input_ids)
            scored = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, (begin, end, score_from) in enumerate(batch):
                targets[row, : end - begin] = stream[begin + 1 : end + 1]
                scored[row, score_from - begin : end - begin] = True

            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scored = scored.to(logits.device)
            picked = logits[scored].float()  # [n, V], only the scored positions
            nll = F.cross_entropy(picked, targets.to(logits.device)[scored], reduction="sum")
            nll_sum += nll.item()
            n_scored += int(scored.sum())

    mean_nll = nll_sum / n_scored
    return {"nll_sum": nll_sum, "n_tokens": n_scored, "mean_nll": mean_nll, "perplexity": math.exp(mean_nll)}


def yes_no_accuracy(
    model: torch.nn.Module,
    examples: Sequence[Sequence[int]],
    labels: Sequence[int],
    verbalizer_ids: Mapping[str, int] | Sequence[int],
    batch_size: int = 16,
    pad_id: int = 0,
    progress: bool = False,
) -> dict:
    """Classify yes/no prompts by comparing the "yes" and "no" logits at the last prompt token.

    examples: token-id lists, each a whole prompt ending in "Answer:". labels: 1 = yes, 0 = no.
    Prompts are sorted by length and right-padded, so each prompt's logits do not depend on
    which other prompts share its batch. A tie between the two logits counts as "no".
    Returns accuracy, n, loss (mean two-way cross-entropy, as in `yes_no_loss`), n_yes and n_no
    (label counts), correct_yes and correct_no (correct predictions per label) and pred_yes.
    """
    if len(examples) != len(labels):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    if len(examples) == 0:
        raise ValueError("yes_no_accuracy needs at least one example")
    bad_labels = sorted({int(label) for label in labels} - {0, 1})
    if bad_labels:
        raise ValueError(f"labels must be 0 (no) or 1 (yes), found {bad_labels}")

    pair = _verbalizer_pair(verbalizer_ids)
    device = _model_device(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]), reverse=True)
    two_way = torch.empty((len(examples), 2), dtype=torch.float32)  # [N, 2] (no, yes) logits

    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _eval_mode(model):
        for batch in tqdm(batches, desc="yes/no", unit="batch", disable=not progress):
            input_ids, attention_mask = pad_batch([examples[i] for i in batch], pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            last = last_token_logits(logits, attention_mask.to(logits.device))  # [B, V]
            two_way[batch] = last[:, pair].float().cpu()

    targets = torch.as_tensor([int(label) for label in labels], dtype=torch.long)
    predictions = (two_way[:, 1] > two_way[:, 0]).long()
    correct = predictions == targets
    return {
        "accuracy": correct.float().mean().item(),
        "n": len(examples),
        "loss": F.cross_entropy(two_way, targets).item(),
        "n_yes": int((targets == 1).sum()),
        "n_no": int((targets == 0).sum()),
        "correct_yes": int((correct & (targets == 1)).sum()),
        "correct_no": int((correct & (targets == 0)).sum()),
        "pred_yes": int(predictions.sum()),
    }


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


@lru_cache(maxsize=None)
def t_quantile_975(df: int) -> float:
    """Return the 0.975 quantile of Student's t with `df` degrees of freedom.

    scipy is not a dependency, so the CDF is integrated with Simpson's rule on [0, x] (the
    density is smooth there) and inverted by bisection. For df = 1, 2, 4 this gives 12.706205,
    4.302653 and 2.776445, the tabulated values to six decimals.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")

    def upper_half_mass(x: float, steps: int = 2000) -> float:  # P(0 <= T <= x)
        h = x / steps
        total = _t_density(0.0, df) + _t_density(x, df)
        for i in range(1, steps):
            total += (4 if i % 2 else 2) * _t_density(i * h, df)
        return total * h / 3

    low, high = 0.0, 20.0  # the df = 1 quantile, 12.71, is the largest
    for _ in range(60):
        mid = (low + high) / 2
        if upper_half_mass(mid) < 0.475:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Return (mean, half width of the 95% Student-t confidence interval of the mean).

    The half width is t_{0.975, n-1} * s / sqrt(n) with s the sample standard deviation.
    With a single value it is NaN, because one value gives no estimate of the spread.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)
