"""Time and peak memory of one causal attention layer: plain SDPA, NTK fast/reference, prefix.

The layer is x [1, L, H*d] -> q, k, v projections -> core attention -> output projection, and
one step is forward + backward. Each (case, L) runs in a fresh subprocess: peak memory is the
rise of the process's peak RSS (ru_maxrss) over its RSS just before the first step, so freed
memory from another case cannot hide a peak. Two times are reported for the steps after that:
the median CPU time of the process (time.process_time), which leaves out time spent waiting for
a core on a shared machine, and the minimum wall time. With one torch thread the two are close
on an idle machine. With --rounds R every case runs in R fresh subprocesses, and the rounds are
interleaved across cases so that a burst of outside load hits all cases alike. The table then
shows the median CPU time, the minimum wall time and the median peak over the rounds.

    python benchmarks/bench_attention.py --lengths 256 1024 4096 --prefix-lengths 16 256 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HEAD_DIM = 64


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def build_layer(case: str, length: int, heads: int, prefix_length: int):
    """Build one benchmark case and return its step function (forward + backward)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ntkattn.attention import NTKConfig, NTKParams

    torch.manual_seed(0)
    hidden = heads * HEAD_DIM
    projections = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(4))
    x = torch.randn(1, length, hidden, requires_grad=True)
    ntk = None
    if case.startswith("ntk"):
        impl = case.split("_")[1]
        ntk = NTKParams(NTKConfig(s=8, impl=impl), heads, HEAD_DIM)
    prefix = None
    if case == "prefix":
        prefix = nn.Parameter(torch.randn(2, 1, heads, prefix_length, HEAD_DIM) * 0.02)

    def split(t):
        return t.view(1, length, heads, HEAD_DIM).transpose(1, 2)  # [B, H, L, d]

    def forward():
        # q, k, v are locals, so they are freed after the forward pass unless the attention saved
        # them for backward, as inside a transformers attention module.
        q, k, v = (split(p(x)) for p in projections[:3])
        if ntk is not None:
            out = ntk.attention(q, k, v, is_causal=True)
        elif prefix is not None:
            k = torch.cat([prefix[0], k], dim=2)
            v = torch.cat([prefix[1], v], dim=2)
            mask = torch.ones(length, prefix_length + length, dtype=torch.bool).tril(diagonal=prefix_length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return projections[3](out.transpose(1, 2).reshape(1, length, hidden))

    def step():
        forward().square().mean().backward()

    return step


def run_worker(case: str, length: int, heads: int, prefix_length: int, reps: int, max_seconds: float) -> dict:
    import torch

    torch.set_num_threads(1)
    step = build_layer(case, length, heads, prefix_length)
    baseline = current_rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline

    wall, cpu, started = [], [], time.perf_counter()
    while len(wall) < reps or (time.perf_counter() - started < max_seconds and len(wall) < 3 * reps):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
        if time.perf_counter() - started > max_seconds and len(wall) >= 2:
            break
    return {"case": case, "length": length, "prefix_length": prefix_length, "cpu_seconds": statistics.median(cpu),
            "seconds": min(wall), "median_seconds": statistics.median(wall), "peak_bytes": peak, "steps": len(wall)}


def run_case(case, length, args, prefix_length=0) -> dict:
    command = [sys.executable, __file__, "--worker", case, str(length), str(prefix_length),
               "--heads", str(args.heads), "--reps", str(args.reps), "--max-seconds", str(args.max_seconds)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def aggregate(runs: list[dict]) -> dict:
    """Combine the rounds of one case: median CPU time, minimum wall time, median peak."""
    row = dict(runs[0])
    row["cpu_seconds"] = statistics.median(run["cpu_seconds"] for run in runs)
    row["seconds"] = min(run["seconds"] for run in runs)
    row["median_seconds"] = statistics.median(run["median_seconds"] for run in runs)
    row["peak_bytes"] = statistics.median(run["peak_bytes"] for run in runs)
    row["steps"] = sum(run["steps"] for run in runs)
    row["rounds"] = len(runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths L")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[16, 256, 4096], help="explicit prefix lengths m")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head dim is 64)")
    parser.add_argument("--reps", type=int, default=3, help="minimum timed steps per case")
    parser.add_argument("--max-seconds", type=float, default=4.0, help="time budget per case, seconds")
    parser.add_argument("--rounds", type=int, default=1, help="fresh subprocesses per case, interleaved across cases")
    parser.add_argument("--cases", nargs="+", default=["sdpa", "ntk_fast", "ntk_reference", "prefix"],
                        help="cases to run; ratios are to the first case listed, so keep sdpa first")
    parser.add_argument("--skip-reference-above", type=int, default=4096, help="skip NTK reference for L above this")
    parser.add_argument("--output", help="write all rows as JSON to this file")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "L", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        case, length, prefix_length = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(run_worker(case, length, args.heads, prefix_length, args.reps, args.max_seconds)))
        return

    rows = []
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average at start: {load}; rounds: {args.rounds}", flush=True)
    print(f"{'case':<14}{'L':>6}{'m':>6}{'cpu ms':>9}{'cpu x':>7}{'wall ms':>10}{'wall x':>8}{'peak MiB':>10}{'mem x':>7}",
          flush=True)
    for length in args.lengths:
        cases = [(case, 0) for case in ("sdpa", "ntk_fast") if case in args.cases]
        if length <= args.skip_reference_above and "ntk_reference" in args.cases:
            cases.append(("ntk_reference", 0))
        if "prefix" in args.cases:
            cases += [("prefix", m) for m in args.prefix_lengths]
        runs = {case: [] for case in cases}
        for _ in range(args.rounds):
            for case, prefix_length in cases:
                runs[(case, prefix_length)].append(run_case(case, length, args, prefix_length))

        base = None
        for case, prefix_length in cases:
            row = aggregate(runs[(case, prefix_length)])
            base = base or row
            row["cpu_ratio"] = row["cpu_seconds"] / base["cpu_seconds"]
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
            rows.append(row)
            print(f"{case:<14}{length:>6}{prefix_length:>6}{row['cpu_seconds'] * 1e3:>9.1f}{row['cpu_ratio']:>7.2f}"
                  f"{row['seconds'] * 1e3:>10.1f}{row['time_ratio']:>8.2f}{row['peak_bytes'] / 2**20:>10.1f}"
                  f"{row['memory_ratio']:>7.2f}", flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
