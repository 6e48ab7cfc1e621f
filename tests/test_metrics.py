import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ntkattn.study.metrics import (
    last_token_logits,
    lm_loss,
    mean_ci95,
    pad_batch,
    perplexity,
    perplexity_windows,
    t_quantile_975,
    yes_no_accuracy,
    yes_no_loss,
)

VOCAB = 7


class HistoryModel(torch.nn.Module):
    """At position p, puts logit h on token (x_p + 1) % VOCAB and 0 elsewhere.

    h is the number of real tokens visible at p (the attention-mask count up to p), so on an
    ascending stream each target has NLL log(1 + (VOCAB - 1) e^-h): known from its history alone.
    """

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        history = attention_mask.cumsum(dim=1).float()  # [B, L]
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(2, ((input_ids + 1) % VOCAB).unsqueeze(-1), history.unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def expected_perplexity(histories):
    nll = [math.log(1 + (VOCAB - 1) * math.exp(-h)) for h in histories]
    return math.exp(sum(nll) / len(nll))


def test_perplexity_disjoint_windows():
    stream = torch.arange(11) % VOCAB  # 10 targets; windows feed positions [0,4) [4,8) [8,10)
    result = perplexity(HistoryModel(), stream, context=4, stride=4, batch_size=2)
    assert result["n_tokens"] == 10
    assert result["perplexity"] == pytest.approx(expected_perplexity([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]), rel=1e-6)
    assert result["mean_nll"] == pytest.approx(math.log(result["perplexity"]), rel=1e-9)
    assert result["nll_sum"] == pytest.approx(result["mean_nll"] * 10, rel=1e-9)


def test_perplexity_strided_windows():
    # Windows start at 0, 2, 4, 6; after the first, only the last 2 predictions count.
    stream = torch.arange(11) % VOCAB
    for batch_size in (1, 3, 8):
        result = perplexity(HistoryModel(), stream, context=4, stride=2, batch_size=batch_size)
        assert result["n_tokens"] == 10
        expected = expected_perplexity([1, 2, 3, 4, 3, 4, 3, 4, 3, 4])
        assert result["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_windows_score_each_target_once():
    for n_tokens, context, stride in [(2, 4, 4), (11, 4, 4), (11, 4, 2), (100, 16, 5), (17, 16, 1)]:
        scored = []
        for begin, end, score_from in perplexity_windows(n_tokens, context, stride):
            assert end - begin <= context
            assert begin <= score_from < end
            scored.extend(range(score_from, end))
        assert scored == list(range(n_tokens - 1))


def test_perplexity_rejects_bad_arguments():
    stream = torch.arange(10)
    with pytest.raises(ValueError, match="stride"):
        perplexity(HistoryModel(), stream, context=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(HistoryModel(), stream[:1], context=4, stride=4)
    with pytest.raises(ValueError, match="1-D integer"):
        perplexity(HistoryModel(), stream.float(), context=4, stride=4)


def tiny_llama(vocab_size=32):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def test_perplexity_single_window_matches_hf_loss():
    model = tiny_llama()
    stream = torch.randint(0, 32, (25,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, stream, context=32, stride=32)
    with torch.no_grad():
        hf_loss = model(input_ids=stream[None], labels=stream[None]).loss.item()
    assert result["n_tokens"] == 24
    assert result["mean_nll"] == pytest.approx(hf_loss, rel=1e-5)
    assert model.training  # the train flag is restored


class LastTokenModel(torch.nn.Module):
    """Logits depend only on the current token: token 5 votes yes (+2), token 6 votes no (+1).

    The pad token 0 votes yes strongly (+9), so reading a pad position changes the prediction.
    """

    YES, NO = 3, 4

    def __init__(self):
        super().__init__()
        table = torch.zeros(10, 10)
        table[5, self.YES] = 2.0
        table[6, self.NO] = 1.0
        table[0, self.YES] = 9.0
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def test_yes_no_accuracy_hand_batch():
    examples = [[1, 2, 5], [1, 6], [2, 2, 2, 6], [5], [1, 6]]
    labels = [1, 0, 1, 1, 1]  # predictions: yes, no, no, yes, no
    verbalizer = {"no": LastTokenModel.NO, "yes": LastTokenModel.YES}
    result = yes_no_accuracy(LastTokenModel(), examples, labels, verbalizer, batch_size=5, pad_id=0)

    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["n"] == 5
    assert (result["n_yes"], result["n_no"]) == (4, 1)
    assert (result["correct_yes"], result["correct_no"]) == (2, 1)
    assert result["pred_yes"] == 2
    # Two-way losses: yes-token rows log(1 + e^-2) when right; no-token rows log(1 + e^-1) when
    # right, log(1 + e^1) when wrong.
    right_yes, right_no, wrong_no = math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), math.log1p(math.e)
    expected_loss = (2 * right_yes + right_no + 2 * wrong_no) / 5
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_yes_no_accuracy_independent_of_batching():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(2)
    lengths = [3, 9, 5, 12, 7, 4, 10]
    examples = [torch.randint(1, 32, (n,), generator=generator).tolist() for n in lengths]
    labels = [1, 0, 1, 1, 0, 0, 1]
    verbalizer = {"no": 7, "yes": 11}

    alone = yes_no_accuracy(model, examples, labels, verbalizer, batch_size=1, pad_id=0)
    together = yes_no_accuracy(model, examples, labels, verbalizer, batch_size=4, pad_id=0)
    assert together["accuracy"] == alone["accuracy"]
    assert together["pred_yes"] == alone["pred_yes"]
    assert together["loss"] == pytest.approx(alone["loss"], abs=1e-5)

    # The loss must equal the one computed prompt by prompt without any padding.
    with torch.no_grad():
        last = torch.stack([model(input_ids=torch.tensor([ex])).logits[0, -1] for ex in examples])
    direct = yes_no_loss(last, torch.tensor(labels), verbalizer).item()
    assert together["loss"] == pytest.approx(direct, abs=1e-5)


def test_yes_no_accuracy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be 0"):
        yes_no_accuracy(LastTokenModel(), [[5]], [2], {"no": 4, "yes": 3})
    with pytest.raises(ValueError, match="1 examples but 2 labels"):
        yes_no_accuracy(LastTokenModel(), [[5]], [1, 0], {"no": 4, "yes": 3})


def test_yes_no_loss_uses_only_verbalizers():
    logits = torch.tensor([[0.0, 50.0, 1.0, 3.0], [0.0, -50.0, 2.0, 0.0]])
    loss = yes_no_loss(logits, torch.tensor([1, 0]), (2, 3))  # (no_id, yes_id)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_last_token_logits_left_and_right_padding():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(last_token_logits(logits, right), torch.stack([logits[0, 1], logits[1, 3]]))
    assert torch.equal(last_token_logits(logits, left), torch.stack([logits[0, 3], logits[1, 3]]))


def test_pad_batch_right_pads():
    input_ids, mask = pad_batch([[4, 5, 6], [7]], pad_id=9)
    assert input_ids.tolist() == [[4, 5, 6], [7, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_lm_loss_shifts_and_ignores():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 1.0  # predicts label 2 at position 1
    labels = torch.tensor([[0, 2, -100]])
    expected = math.log(3 + math.e) - 1.0
    assert lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n, t", [(2, 12.706), (3, 4.303), (5, 2.776), (11, 2.228), (31, 2.042)])
def test_t_quantile_matches_table(n, t):
    assert t_quantile_975(n - 1) == pytest.approx(t, abs=5e-4)


def test_mean_ci95_known_values():
    mean, half = mean_ci95([1.0, 3.0])  # s = sqrt(2), n = 2
    assert mean == 2.0
    assert half == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2), rel=1e-4)

    mean, half = mean_ci95([2.0, 4.0, 6.0, 8.0, 10.0])  # s = sqrt(10), n = 5
    assert mean == 6.0
    assert half == pytest.approx(2.7764 * math.sqrt(10) / math.sqrt(5), rel=1e-4)


def test_mean_ci95_single_value_is_nan():
    mean, half = mean_ci95([0.5])
    assert mean == 0.5
    assert math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci95([])
