"""Why Mamba-1 stays on the MQAR copy plateau in the recall example (issue 16, helper mamba10).

1. Correctness first: nn.Mamba on the GPU (default kernels, float32) against the layer written out
   from mamba-ssm's Mamba forward in float64 (tests/test_nn.py `_mamba_by_definition`'s algebra,
   repeated here so the script stands alone), forward and every gradient.
2. Then the recall example's Mamba at its default task (seq 64, 8 pairs, vocab 64, batch 256) under
   one change at a time: steps (1500 = the old budget, 4500 = recall's new default for mamba,
   `STEPS_SCALE`, 6000), learning rate, d_state, Zoology's model-wide initialisation (Linear
   weights N(0, 0.02), every Linear bias 0 -- dt_proj's too, so softplus(dt) ~ 0.69), an easier
   task (4 pairs); gla / mamba2 as controls. Prints a table last.

    python3 bench/gpu_mamba_recall.py            # ~3 min on one H100
    ONLY=check python3 bench/gpu_mamba_recall.py # the correctness part only
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssm_kernels.nn as snn  # noqa: E402
from ssm_kernels.examples import recall  # noqa: E402


def mamba_by_definition(m, u):
    """mamba-ssm's Mamba forward (no fast path) with a loop over time; m's parameters."""
    T = u.shape[1]
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = F.silu(m.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))
    dt, Bm, Cm = torch.split(m.x_proj(x), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(m.dt_proj(dt))
    A = -torch.exp(m.A_log)
    h = torch.zeros(u.shape[0], m.d_inner, m.d_state, dtype=u.dtype, device=u.device)
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None]
        ys.append((h * Cm[:, t, None]).sum(-1) + m.D * x[:, t])
    return m.out_proj(torch.stack(ys, 1) * F.silu(z))


def check(device) -> list:
    rows = []
    for d, T in [(64, 64), (128, 64)] if device.type == "cuda" else [(16, 12)]:
        torch.manual_seed(0)
        m = snn.Mamba(d).to(device)
        r = snn.Mamba(d, backend="reference").to(device).double()
        r.load_state_dict(m.state_dict())
        x = torch.randn(4, T, d, device=device)
        x64 = x.double().requires_grad_()
        x.requires_grad_()
        out, ref = m(x), mamba_by_definition(r, x64)
        g = torch.randn_like(ref)
        ga = torch.autograd.grad(out, [x] + list(m.parameters()), g.float())
        gb = torch.autograd.grad(ref, [x64] + list(r.parameters()), g)
        names = ["out", "dx"] + ["d" + n for n, _ in m.named_parameters()]
        errs = [(out.double() - ref).norm() / ref.norm()]
        errs += [(a.double() - b).norm() / b.norm().clamp_min(1e-30) for a, b in zip(ga, gb)]
        worst = max(zip(errs, names))
        rows.append((d, T, float(worst[0]), worst[1]))
        print(f"check d={d} T={T}: worst rel err {float(worst[0]):.2e} ({worst[1]})", flush=True)
    return rows


def zoology_init(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


VARIANTS = [  # (name, mixer, dims, extra argv, d_state, zoology init); equal steps unless named
    ("gla (control)", "gla", [64], [], None, False),
    ("mamba2 (control)", "mamba2", [64], [], None, False),
    ("mamba 1500 (old)", "mamba", [64, 128], [], 16, False),
    ("mamba 4500 (new dflt)", "mamba", [64, 128], ["--steps-scale", "mamba=3"], 16, False),
    ("mamba 6000", "mamba", [64], ["--steps-scale", "mamba=4"], 16, False),
    ("mamba lr 1e-2", "mamba", [64], ["--lr", "1e-2"], 16, False),
    ("mamba 4500 lr 1e-2", "mamba", [64, 128], ["--steps-scale", "mamba=3", "--lr", "1e-2"], 16,
     False),
    ("mamba d_state 64", "mamba", [64], [], 64, False),
    ("mamba zoology init", "mamba", [64], [], 16, True),
    ("mamba 4 pairs", "mamba", [64], ["--pairs", "4"], 16, False),
]


def main():
    device = torch.device(os.environ.get("DEVICE", "cuda"))
    dry = os.environ.get("DRY") == "1"   # CPU dry run of the script's plumbing (2 steps, small)
    rows = check(device)
    if os.environ.get("ONLY") == "check":
        return
    orig = recall.make_mixer
    table = []
    for name, mixer, dims, extra, d_state, zinit in VARIANTS:
        def make(n, d, seq_len, backend, d_state=d_state, zinit=zinit):
            if n != "mamba":
                return orig(n, d, seq_len, backend)
            m = snn.Mamba(d, d_state=d_state, d_conv=4, expand=2, backend=backend)
            if zinit:
                zoology_init(m)
            return m, m.d_inner * (d_state + 3) * 4
        recall.make_mixer = make
        if dry:
            dims = dims[:1]
        if "--steps-scale" not in extra:
            extra = extra + ["--steps-scale"]          # no values: the same steps for every mixer
        args = recall.parse_args(["--mixers", mixer, "--dims", *map(str, dims), "--no-ahead"]
                                 + extra + (["--steps", "2", "--batch", "4", "--eval-batches", "1",
                                             "--step", "eager"] if dry else []))
        for d in dims:
            t0 = time.time()
            try:
                r = recall.train_one(mixer, d, args, device, None)
                table.append((name, d, r["accuracy"], r["loss"], time.time() - t0))
            except Exception as e:  # keep going: one failed variant must not hide the others
                print(f"{name} d={d}: {type(e).__name__}: {e}", flush=True)
                table.append((name, d, float("nan"), float("nan"), time.time() - t0))
    recall.make_mixer = orig
    print("\ncorrectness (GPU float32 vs float64 definition, worst relative error):")
    for d, T, e, n in rows:
        print(f"  d={d} T={T}: {e:.2e} ({n})")
    print(f"\n{'variant':<22}{'d':>5}{'accuracy':>10}{'loss':>8}{'s':>7}")
    for name, d, acc, loss, s in table:
        print(f"{name:<22}{d:>5}{acc:>10.3f}{loss:>8.3f}{s:>7.1f}")


if __name__ == "__main__":
    main()
