"""Time one fine-tuning step (forward + backward + AdamW step): NTK-Attention vs LoRA.

The model is a randomly initialised LlamaForCausalLM with SmolLM2-135M's shape: 30 layers,
hidden 576, 9 heads, 3 key/value heads, head dim 64, intermediate 1536, vocab 49152. No weights
are downloaded. LoRA is peft's r=8, alpha=16 on q_proj and v_proj. Both methods freeze the base
model and train the same batch of random tokens; methods alternate step by step so that load
from other processes affects both alike.

    python benchmarks/bench_finetune_step.py --steps 3 --batch 4 --length 256
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ntkattn import NTKConfig, inject_ntk, ntk_parameters

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
)


def build_methods(layers: int) -> dict:
    """Build NTK and LoRA copies of one random base model: {name: (model, optimizer, trainable count)}."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}))
    ntk_model = inject_ntk(copy.deepcopy(base), NTKConfig())
    lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"]))
    methods = {}
    for name, model, params in [("ntk", ntk_model, ntk_parameters(ntk_model)),
                                ("lora", lora_model, [p for p in lora_model.parameters() if p.requires_grad])]:
        model.train()
        methods[name] = (model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))
    return methods


def train_step(model, optimizer, ids) -> float:
    begin = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method after one warm-up step")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30 in SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", help="write the result as JSON to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    methods = build_methods(args.layers)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in methods}
    for step in range(args.steps + 1):
        for name, (model, optimizer, _) in methods.items():
            seconds = train_step(model, optimizer, ids)
            if step > 0:  # step 0 is warm-up
                times[name].append(seconds)

    result = {name: {"median_seconds": statistics.median(values), "steps": values, "trainable": methods[name][2]}
              for name, values in times.items()}
    result["ntk_over_lora"] = result["ntk"]["median_seconds"] / result["lora"]["median_seconds"]
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
