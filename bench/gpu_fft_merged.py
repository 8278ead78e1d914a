"""GPU A/B of cufft.MERGED_INVERSE (the float32 backward's two inverse transforms as one cuFFT call;
see ssm_kernels/fft_conv/cufft.py), B=8 H=768 float32, D on, gates off / on, L 1024 / 2048 / 4096.

(a) bitwise: forward+backward (y, du, dk, dD, gate grads) with the flag on must equal the flag off
    exactly (cuFFT then runs other batch counts; on the CPU pocketfft is bitwise equal), and both
    are checked against float64 torch.fft (ssm_kernels.testing.compare);
(b) time: f+b (do_bench median), host ms per f+b call (unsynchronised), flag off / on, next to
    torch's rfft conv. The last lines are the table; `adopt` says whether to turn the flag on.
    python3 bench/gpu_fft_merged.py        (FFT_BENCH_SMOKE=1: tiny CPU run in the interpreter)"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_fft import DEV, SMOKE, bench, fwd_bwd, log, make  # noqa: E402  (sets TRITON_INTERPRET for smoke runs)
from gpu_monarch import host_ms  # noqa: E402  (Python + launch time per call, unsynchronised)

import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.fft_conv import cufft as fc  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402


def ours(*ins):
    return sk.fft_conv(ins[0], ins[1], ins[2], pre_gate=ins[3], post_gate=ins[4], backend="triton")


def ref(*ins):
    return fft_conv_ref(ins[0], ins[1], ins[2], pre_gate=ins[3], post_gate=ins[4])


def main():
    B, H = (2, 5) if SMOKE else (8, 768)
    Ls = (200,) if SMOKE else (1024, 2048, 4096)
    rows, all_same = [], True
    fi.FORCE_PATH = "cufft"  # float32 goes there anyway; explicit for the smoke run
    for L in Ls:
        for gates in (False, True):
            ins = make(B, H, L, torch.float32, gates=gates)
            dy = torch.randn(B, H, L, device=DEV)
            out = {}
            for m in (False, True):
                fc.MERGED_INVERSE = m
                out[m] = fwd_bwd(sk.fft_conv, ins, dy, backend="triton")
            same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(out[False], out[True]))
            all_same &= same
            hi = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], dy.double())
            ok = True
            for name, a, b in zip(("y", "du", "dk", "dD", "dpre", "dpost"), out[True], hi):
                if a is not None:
                    v = compare(f"L={L} g={int(gates)} {name}", a, b, torch.float32)
                    ok &= bool(v.ok)
                    if not v.ok:
                        log(f"  FAIL {v}")
            insg = [None if x is None else x.detach().requires_grad_() for x in ins]
            live = [x for x in insg if x is not None]
            r = {"L": L, "gates": gates, "bitwise": same, "ok": ok}
            for m in (False, True):
                fc.MERGED_INVERSE = m
                fb = lambda: torch.autograd.grad(ours(*insg), live, dy)  # noqa: E731
                r[f"f+b {int(m)}"] = bench(fb)
                r[f"host {int(m)}"] = host_ms(fb)
            fbt = lambda: torch.autograd.grad(ref(*insg), live, dy)  # noqa: E731
            r["torch f+b"] = bench(fbt)
            fc.MERGED_INVERSE = False
            rows.append(r)
            log(r)
    print("\n==== cufft.MERGED_INVERSE A/B, float32, B=%d H=%d, D on (ms; host = per f+b call, "
          "unsynchronised) ====" % (B, H))
    print(f"{'case':16s} {'bitwise':>7s} {'ok':>4s} | {'f+b off':>7s} {'f+b on':>7s} | {'host off':>8s} "
          f"{'host on':>8s} | {'torch':>6s} {'x off':>5s} {'x on':>5s}")
    for r in rows:
        print(f"L={r['L']} g={'on' if r['gates'] else 'off'}".ljust(16),
              f"{str(r['bitwise']):>7s} {str(r['ok']):>4s} | {r['f+b 0']:7.3f} {r['f+b 1']:7.3f} | "
              f"{r['host 0']:8.3f} {r['host 1']:8.3f} | {r['torch f+b']:6.3f} "
              f"{r['torch f+b'] / r['f+b 0']:5.2f} {r['torch f+b'] / r['f+b 1']:5.2f}")
    faster = all(r["f+b 1"] <= r["f+b 0"] * 1.01 for r in rows)
    print(f"adopt MERGED_INVERSE = True: {all_same and faster and all(r['ok'] for r in rows)} "
          f"(bitwise equal everywhere: {all_same}; never slower than 1%: {faster})")


if __name__ == "__main__":
    main()
