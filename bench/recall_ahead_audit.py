"""Offline (no GPU): what the recall example's first steps compile, and compile_all_ahead's pool.

    PYTHONPATH=. python bench/recall_ahead_audit.py [--threads 0|N] [--mixers ...] [--dims ...]

Under bench/sm90_audit's stub driver (sm_90 target, every Triton launch compiles and returns), runs
each (mixer, width) model's `recall.first_steps` (training forward + backward, the evaluation's
forward; bf16 autocast, the example's default shapes) on CPU tensors. --threads 0: one model after
another, as the example's first steps compile without compile-ahead, printing each model's new
Triton compiles and seconds. --threads N: all of them inside one `compiling_ahead(N)` block, as
`recall.compile_all_ahead` does on the GPU, then every model again (the real first steps: they
should compile nothing). Mamba's selective scan takes Triton here (no _C on this machine); on the
GPU it is the CUDA kernel (nothing to compile). Wall times on a shared 2-core box are 2-3x the GPU
machine's (NOTES 'First call').
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_audit as audit  # noqa: E402

import torch  # noqa: E402
import triton.compiler as tc  # noqa: E402

audit.install()
n_compiles = [0]
_orig = tc.compile


def _counted(*a, **k):
    n_compiles[0] += 1
    return _orig(*a, **k)


tc.compile = _counted

from ssm_kernels._warmup import compiling_ahead  # noqa: E402
from ssm_kernels.examples import recall  # noqa: E402

# the stub launches nothing: outputs are garbage (NaN), which the CPU-only value checks would
# reject (on the GPU they run only in debug mode); switch them off in every module holding one
for _m in list(sys.modules.values()):
    if getattr(_m, "__name__", "").startswith("ssm_kernels") and hasattr(_m, "checks_values"):
        _m.checks_values = lambda x: False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--mixers", nargs="+", default=[m for m in recall.MIXERS if m != "attention"])
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    a = p.parse_args()
    args = recall.parse_args(["--mixers", *a.mixers, "--dims", *map(str, a.dims)])
    dev = torch.device("cpu")
    tokens, labels = recall.mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, dev,
                                       torch.Generator().manual_seed(0))

    def one(mixer, d):   # a training step's forward + backward, then the evaluation's forward
        model = recall.Model(mixer, args.vocab, d, args.seq_len, args.layers, None)
        recall.first_steps(model, tokens, labels, dev)

    t0 = time.time()
    if a.threads == 0:
        for mixer in a.mixers:
            for d in a.dims:
                c, t = n_compiles[0], time.time()
                one(mixer, d)
                print(f"{mixer:<15} d={d:<4} {n_compiles[0] - c:3d} compiles "
                      f"{time.time() - t:6.1f}s", flush=True)
        print(f"serial: {n_compiles[0]} compiles, {time.time() - t0:.1f}s")
    else:
        failed = []
        with compiling_ahead(a.threads) as info:
            for mixer in a.mixers:
                for d in a.dims:
                    try:
                        one(mixer, d)
                    except Exception as e:
                        failed.append(f"{mixer} d={d}: {type(e).__name__}: {e}")
        ahead, wall = n_compiles[0], time.time() - t0
        for mixer in a.mixers:     # the real steps that follow: should compile nothing
            for d in a.dims:
                one(mixer, d)
        print(f"ahead({a.threads}): {info['kernels']} submitted, {ahead} compiles, "
              f"{info['errors']} errors, {wall:.1f}s; dry runs stopped: {failed}; "
              f"compiles in the real steps after: {n_compiles[0] - ahead}")


if __name__ == "__main__":
    main()
