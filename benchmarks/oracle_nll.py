"""The entropy of each dataset (its oracle NLL, nats): the floor under nll_ebm and nll_flow.

    python benchmarks/oracle_nll.py [--n 100000] [--seed 0]

Monte Carlo on held-out samples: H = -mean log p_d(x), with its standard error. The densities
are exact (8gaussians, checkerboard, rings, pinwheel) or a converged quadrature (the spirals).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fce.data import DATASETS, make_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dataset | entropy (nats) | standard error | seconds |")
    print("|---|---|---|---|")
    for name, dataset in DATASETS.items():
        x = dataset.sample(args.n, make_generator(args.seed, "oracle"), torch.float64)
        started = time.perf_counter()
        log_p = dataset.log_prob(x)
        seconds = time.perf_counter() - started
        error = log_p.std().item() / math.sqrt(args.n)
        print(f"| {name} | {-log_p.mean().item():.4f} | {error:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
