#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The peer of bench_moe's layer rows in PyTorch: the same MoE layer, run the way a PyTorch user
writes it (route, sort the (token, slot) pairs by expert, one addmm pair per expert, index_add),
timed on the same machine so that sparsemoe's rows can be read as multiples of it.

Layer (bench_moe's configs): T tokens of width d, E ReLU experts of hidden width h with biases,
top-k of softmax(x·W_g) renormalised over the k (the noise-free routing of the 2017 gate's
evaluation mode: identical FLOPs). Forward FLOPs 4·T·k·d·h (two GEMMs per grouped row); forward +
backward counts 3× that, as bench_moe does (∂X and ∂W for both GEMMs).

Prints one tab-separated line per row: config, phase, threads, best seconds, GFLOP/s.

    /usr/bin/python3 bench/pytorch_moe.py [--configs A,B,C] [--threads 2] [--repeats 5] [--min-time 0.3]

--threads is torch's intra-op thread count (torch.set_num_threads); OpenBLAS takes its own from
OPENBLAS_NUM_THREADS (scripts/compare-pytorch sets both).

Needs Debian's python3-torch (apt-get install python3-torch libopenblas0-pthread). Debian's torch
runs its CPU GEMMs through the system BLAS: the pthread OpenBLAS is the fastest one packaged.
"""
import argparse
import sys
import time

try:
    import torch
except ImportError:
    sys.stderr.write("pytorch_moe.py: python3-torch is missing (apt-get install python3-torch "
                     "libopenblas0-pthread); run it with Debian's /usr/bin/python3\n")
    sys.exit(77)

# label: (tokens, d, h, experts, k) -- the same shapes as bench/bench_moe.cpp's configs.
CONFIGS = {
    "A": (4096, 512, 2048, 8, 2),
    "B": (4096, 1024, 4096, 16, 2),
    "C": (512, 512, 2048, 64, 4),
    "D": (64, 512, 2048, 8, 2),
}


class MoE(torch.nn.Module):
    def __init__(self, d, h, experts, k):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, experts, bias=False)
        # One parameter per expert and matrix, as Hugging Face's per-expert modules hold them: slicing
        # one stacked E×d×h parameter would make autograd write a full E×d×h gradient per expert.
        def parameters(shape, bound):
            return torch.nn.ParameterList(
                torch.nn.Parameter(torch.empty(shape).uniform_(-bound, bound)) for _ in range(experts))
        self.w1 = parameters((d, h), d ** -0.5)
        self.b1 = parameters((h,), 0.0)
        self.w2 = parameters((h, d), h ** -0.5)
        self.b2 = parameters((d,), 0.0)

    def forward(self, x):
        probabilities = torch.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probabilities, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        tokens = order // self.k
        counts = torch.bincount(flat_ids, minlength=len(self.w1)).tolist()
        grouped = x.index_select(0, tokens)
        outputs = []
        first = 0
        for e, rows in enumerate(counts):
            if rows == 0:
                continue
            block = grouped[first:first + rows]
            hidden = torch.relu(torch.addmm(self.b1[e], block, self.w1[e]))
            outputs.append(torch.addmm(self.b2[e], hidden, self.w2[e]))
            first += rows
        expert_output = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, expert_output)


def best_seconds(step, repeats, min_time):
    step()  # warm-up: allocator, BLAS threads
    best = float("inf")
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            step()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / calls)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="A,B,C,D")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("config\tphase\tthreads\tseconds\tGFLOPps")
    for label in args.configs.split(","):
        tokens, d, h, experts, k = CONFIGS[label]
        layer = MoE(d, h, experts, k)
        x = torch.empty(tokens, d).uniform_(-1, 1)
        d_y = torch.empty(tokens, d).uniform_(-1, 1)
        flops = 4.0 * tokens * k * d * h

        def forward():
            with torch.no_grad():
                layer(x)

        def forward_backward():
            x_leaf = x.detach().requires_grad_(True)
            layer.zero_grad(set_to_none=False)
            layer(x_leaf).backward(d_y)

        for phase, step, work in (("forward", forward, flops), ("forward_backward", forward_backward, 3 * flops)):
            seconds = best_seconds(step, args.repeats, args.min_time)
            print(f"{label}\t{phase}\t{args.threads}\t{seconds:.6g}\t{work / seconds * 1e-9:.1f}", flush=True)


if __name__ == "__main__":
    main()
