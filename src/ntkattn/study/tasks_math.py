"""Task plug-in `math`: GSM8K-format word problems, scored by exact match of the final number.

Training is next-token prediction on "Question: ...\\nAnswer:" followed by the reference solution
(calculator annotations <<...>> removed), with the loss on the solution tokens only. Scoring
generates greedily for at most `max_new_tokens` tokens and compares the final number of the
output (after "####" when present, else the last number) with the reference's "#### <number>".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ntkattn.study import metrics
from ntkattn.study.tasks import DataError, _load_split

PROMPT = "Question: {question}\nAnswer:"
CALCULATOR = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
EVAL_BATCH_SIZE = 8


def final_number(text: str) -> str | None:
    """Extract the final number of a solution text in canonical form ('1,000.50' -> '1000.5'), or None."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or "0"


def clean_solution(answer: str) -> str:
    return CALCULATOR.sub("", answer).strip()


class MathTask:
    """Greedy-generation exact match; see the module docstring."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, data_dir: Path, cfg: Mapping[str, Any]):
        from transformers import AutoTokenizer

        self.cfg = cfg
        folder = Path(data_dir) / "tokenizer"
        if not folder.is_dir():
            raise DataError(f"{folder} not found; rerun the prepare_data stage (it saves the tokenizer)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError(f"tokenizer in {folder} has no EOS token to end a solution")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.max_length = int(cfg.get("max_length") or 512)
        self.splits = {split: _load_split(Path(data_dir), split) for split in ("train", "validation", "test")}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def train_batch(self, gen: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        table = self.splits["train"]
        rows = torch.randint(0, len(table), (batch_size,), generator=gen).tolist()
        sequences, labels = [], []
        for row in rows:
            prompt = self._encode(PROMPT.format(question=table[row]["question"]))
            solution = self._encode(" " + clean_solution(table[row]["answer"])) + [self.eos_id]
            ids = (prompt + solution)[: self.max_length]
            sequences.append(ids)
            labels.append(([-100] * len(prompt) + solution)[: self.max_length])  # loss on the solution only
        input_ids, attention_mask = metrics.pad_batch(sequences, self.pad_id)  # [B, L]
        label_ids = torch.full_like(input_ids, -100)
        for i, row_labels in enumerate(labels):
            label_ids[i, : len(row_labels)] = torch.tensor(row_labels)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return metrics.lm_loss(logits, batch["labels"])

    def generate(self, model: nn.Module, questions: list[str]) -> list[str]:
        """Greedy continuations of the prompts, left-padded so every prompt ends at the same position."""
        prompts = [self._encode(PROMPT.format(question=q))[-self.max_length:] for q in questions]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        device = next(model.parameters()).device
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
                             max_new_tokens=int(self.cfg.get("max_new_tokens") or 256),
                             pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        return self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)

    def score(self, model: nn.Module, split: str, progress: bool = False) -> dict[str, Any]:
        table = self.splits[split]
        if split == "validation" and self.cfg.get("max_val_examples"):
            table = table.select(range(min(len(table), self.cfg["max_val_examples"])))
        was_training = model.training
        model.eval()
        correct, samples = 0, []
        with torch.no_grad():
            for start in range(0, len(table), EVAL_BATCH_SIZE):
                chunk = table.select(range(start, min(start + EVAL_BATCH_SIZE, len(table))))
                for output, reference in zip(self.generate(model, chunk["question"]), chunk["answer"]):
                    hit = final_number(output) is not None and final_number(output) == final_number(reference)
                    correct += hit
                    if len(samples) < 3:
                        samples.append({"output": output[:300], "predicted": final_number(output),
                                        "reference": final_number(reference)})
        model.train(was_training)
        accuracy = correct / len(table)
        return {"accuracy": accuracy, "n": len(table), "value": accuracy, "samples": samples}
