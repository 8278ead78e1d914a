"""GPU check + benchmark for issue 16: causal_conv1d, the ssm_kernels.nn layers, the recall example.
Self-contained (about 2-3 minutes on one H200, most of it Triton compiling):

    pip install --no-build-isolation --no-deps -e .     # or PYTHONPATH=. (pure Python is enough)
    python bench/gpu_layers.py                          # OUT=/some/dir also writes gpu_layers.csv

(a) causal_conv1d at real sizes against the float64 reference (on the GPU): fp32/bf16, widths
    2-4, both layouts (time-contiguous and channel-last), initial/final states, every gradient,
    cu_seqlens, seq_idx, decode steps (shifted and circular); outputs NaN-poisoned first.
(b) causal_conv1d timing (do_bench median) vs F.conv1d + slicing (and the causal-conv1d package if
    importable), with % of the copy-bandwidth floor (x read once, y written once; fwd+bwd adds
    x and dy read, dx written), measured in the same run.
(c) every layer: forward+backward at a real size under bf16 autocast (time, finite), and the
    decode steps against the parallel form in fp32 on the GPU.
(d) the recall example at a reduced size (one width, few steps): end-to-end time and accuracies.
Exit status 1 if any check fails. The summary table is printed last.
"""
from __future__ import annotations

import csv
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
import ssm_kernels.nn as snn  # noqa: E402
from ssm_kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from ssm_kernels.testing import compare, rel_err  # noqa: E402

# SMOKE=1: a tiny run of this script's logic on the CPU (Triton interpreter), no timings of note
SMOKE = os.environ.get("SMOKE", "0") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = "cpu" if SMOKE else "cuda"
S = dict(B=2, D=24, T=40, lens=[7, 1, 2, 13, 5], Dv=16, Tv=30, Bd=2, Dd=16, Td=12, pre=8,
         bench=(2, 32, 64), d=32, Tl=32, Bl=2, Ts=6) if SMOKE else \
    dict(B=4, D=1536, T=2048, lens=[700, 1, 2, 1300, 45], Dv=768, Tv=1000, Bd=8, Dd=1536, Td=40,
         pre=32, bench=(8, 3072, 2048), d=512, Tl=2048, Bl=4, Ts=48)
FAILS: list = []
ROWS: list = []  # dict(section, case, impl, mode, dtype, value, unit, note)
T0 = time.time()
# LAYERS_SECTIONS="layers recall" runs only those sections (first word of a section's name)
SECTIONS = os.environ.get("LAYERS_SECTIONS", "").split()


def row(section, case, impl, mode, dtype, value, unit, note=""):
    ROWS.append(dict(section=section, case=case, impl=impl, mode=mode, dtype=str(dtype).replace("torch.", ""),
                     value=value, unit=unit, note=note))
    if section != "check":  # printed as they come too: a call cut short still shows its rows
        print(f"   {section} {case} {impl} {mode} {value} {unit} {note}", flush=True)


def verdict(case, out, ref, dtype, lowp=None):
    v = compare(case, out, ref, dtype, lowp)
    row("check", case, "ssm_kernels.triton", "", dtype, f"{v.err:.3e}", "rel err",
        f"bound {v.bound:.2e} {'ok' if v.ok else 'FAIL'}")
    if not v.ok:
        FAILS.append(str(v))
        print("  FAIL", v, flush=True)


def do_bench(fn, warmup, rep, return_mode="median"):
    if SMOKE:  # one timed call on the CPU
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench as bench
    return bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)


def poison():
    blocks = []
    for mb in (1, 8, 64, 256, 1024):
        try:
            blocks += [torch.full((mb << 18,), float("nan"), device=DEV) for _ in range(3)]
        except RuntimeError:
            break
    del blocks


# ---- (a) causal_conv1d correctness -----------------------------------------------------------------

def _x(B, D, T, layout, dtype):
    x = torch.randn(B, D, T, device=DEV) if layout == "bdt" else torch.randn(B, T, D, device=DEV).transpose(1, 2)
    return x.to(dtype)


def _fb(fn, x, w, b, h0, cot, **kw):
    ins = [t.detach().requires_grad_() for t in (x, w, b, h0)]
    out, fin = fn(ins[0], ins[1], ins[2], None, ins[3], True, None, "silu", **kw)
    loss = (out.double() * cot[0]).sum() + (fin.double() * cot[1]).sum()
    return [out, fin, *torch.autograd.grad(loss, ins)]


NAMES = ["out", "final", "dx", "dweight", "dbias", "dinit"]


def conv_checks():
    B, D, T = S["B"], S["D"], S["T"]
    for dtype, W, layout in [(torch.float32, 4, "bdt"), (torch.float32, 4, "btd"),
                             (torch.bfloat16, 4, "bdt"), (torch.bfloat16, 4, "btd"),
                             (torch.float32, 2, "bdt"), (torch.bfloat16, 3, "btd")]:
        x = _x(B, D, T, layout, dtype)
        w, b = torch.randn(D, W, device=DEV) / W ** 0.5, torch.randn(D, device=DEV)
        h0 = torch.randn(B, D, W - 1, device=DEV).to(dtype)
        cot = (torch.randn(B, D, T, device=DEV, dtype=torch.float64),
               torch.randn(B, D, W - 1, device=DEV, dtype=torch.float64))
        poison()
        out = _fb(sk.causal_conv1d_fn, x, w, b, h0, cot, backend="triton")
        ref = _fb(causal_conv1d_ref, *(t.double() for t in (x, w, b, h0)), cot)
        lowp = _fb(causal_conv1d_ref, x, w, b, h0, cot) if dtype != torch.float32 else [None] * 6
        for i, n in enumerate(NAMES):
            verdict(f"conv W={W} {layout} {n}", out[i], ref[i], dtype, lowp[i])
        if out[0].stride() != x.stride():
            FAILS.append(f"conv {layout}: out strides {out[0].stride()} != x's {x.stride()}")
    # packed sequences with per-sequence states
    lens = S["lens"]
    Dv = S["Dv"]
    cu = torch.tensor([0] + lens, device=DEV).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(1, Dv, T, "btd", dtype)
        w, b = torch.randn(Dv, 4, device=DEV) / 2, torch.randn(Dv, device=DEV)
        h0 = torch.randn(len(lens), Dv, 3, device=DEV).to(dtype)
        cot = (torch.randn(1, Dv, T, device=DEV, dtype=torch.float64),
               torch.randn(len(lens), Dv, 3, device=DEV, dtype=torch.float64))
        out = _fb(sk.causal_conv1d_fn, x, w, b, h0, cot, cu_seqlens=cu, backend="triton")
        ref = _fb(causal_conv1d_ref, *(t.double() for t in (x, w, b, h0)), cot, cu_seqlens=cu)
        lowp = _fb(causal_conv1d_ref, x, w, b, h0, cot, cu_seqlens=cu) if dtype != torch.float32 else [None] * 6
        for i, n in enumerate(NAMES):
            verdict(f"conv varlen {n}", out[i], ref[i], dtype, lowp[i])
    # seq_idx
    Tv = S["Tv"]
    x = _x(2, Dv, Tv, "btd", torch.float32)
    w, b = torch.randn(Dv, 4, device=DEV) / 2, torch.randn(Dv, device=DEV)
    seq_idx = (torch.arange(Tv, device=DEV) // 7).to(torch.int32).expand(2, -1).contiguous()
    out = sk.causal_conv1d_fn(x, w, b, seq_idx, activation="silu", backend="triton")
    verdict("conv seq_idx out", out, causal_conv1d_ref(x.double(), w.double(), b.double(), seq_idx,
                                                       activation="silu"), torch.float32)
    # decode: prefill + steps (shifted state), and a circular buffer
    Bd, Dd, Td, P = S["Bd"], S["Dd"], S["Td"], S["pre"]
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(Bd, Dd, Td, "bdt", dtype)
        w, b = torch.randn(Dd, 4, device=DEV) / 2, torch.randn(Dd, device=DEV)
        full = causal_conv1d_ref(x.double(), w.double(), b.double(), activation="silu")
        _, st = sk.causal_conv1d_fn(x[..., :P], w, b, return_final_states=True, backend="triton")
        st = st.float().contiguous()
        ys = [sk.causal_conv1d_update(x[..., t], st, w, b, "silu", backend="triton") for t in range(P, Td)]
        lowp = causal_conv1d_ref(x, w, b, activation="silu")[..., P:] if dtype != torch.float32 else None
        verdict("conv update steps", torch.stack(ys, -1), full[..., P:], dtype, lowp)
    state = torch.randn(Bd, Dd, 7, device=DEV)
    cache = torch.randint(0, 20, (Bd,), device=DEV, dtype=torch.int32)
    x = torch.randn(Bd, Dd, 3, device=DEV)
    st_ref = state.clone().double()
    y = sk.causal_conv1d_update(x, state, w, b, "silu", cache, backend="triton")
    y_ref = causal_conv1d_update_ref(x.double(), st_ref, w.double(), b.double(), "silu", cache)
    verdict("conv update circular", y, y_ref, torch.float32)
    verdict("conv update circular state", state, st_ref, torch.float32)


# ---- (b) causal_conv1d timing ----------------------------------------------------------------------

def copy_gbps():
    a = torch.empty(1 << (16 if SMOKE else 28), device=DEV).uniform_()
    c = torch.empty_like(a)
    ms = do_bench(lambda: c.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def conv_bench(bw):
    try:
        from causal_conv1d import causal_conv1d_fn as peer
    except Exception:
        peer = None
    (B, D, T), W = S["bench"], 4
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        n = B * D * T
        for layout in ("bdt", "btd"):
            x = _x(B, D, T, layout, dtype)
            w = torch.randn(D, W, device=DEV, dtype=dtype)
            b = torch.randn(D, device=DEV, dtype=dtype)
            impls = {"ssm_kernels": lambda x, w, b: sk.causal_conv1d_fn(x, w, b, activation="silu"),
                     "F.conv1d+slice": lambda x, w, b: F.silu(F.conv1d(x, w[:, None], b, padding=W - 1,
                                                                       groups=D)[..., :T])}
            if peer is not None:
                impls["causal-conv1d"] = lambda x, w, b: peer(x, w, b, activation="silu")
            for name, f in impls.items():
                case = f"B={B} D={D} T={T} W={W} {layout}"
                for mode, nbytes in (("fwd", 2 * n * es), ("fwd+bwd", 5 * n * es)):
                    try:
                        if mode == "fwd":
                            fn = lambda: f(x, w, b)  # noqa: E731
                        else:
                            xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
                            dy = torch.randn_like(x)

                            def fn():
                                torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), dy)
                        ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
                        floor = nbytes / (bw * 1e9) * 1e3
                        row("conv bench", case, name, mode, dtype, round(ms, 4), "ms",
                            f"{100 * floor / ms:.0f}% of copy floor")
                    except Exception as e:
                        row("conv bench", case, name, mode, dtype, "nan", "ms", f"error {type(e).__name__}")


# ---- (c) layers --------------------------------------------------------------------------------------

def layers():
    d, T, B, Ts = S["d"], S["Tl"], S["Bl"], S["Ts"]
    makers = {
        "Mamba": lambda: snn.Mamba(d, d_state=16),
        "Mamba2": lambda: snn.Mamba2(d, d_state=64, headdim=min(64, d)),
        "GLA": lambda: snn.GatedLinearAttention(hidden_size=d, num_heads=4, use_short_conv=True),
        "Hyena": lambda: snn.HyenaOperator(d, l_max=T, order=2),
        "MinGRU": lambda: snn.MinGRU(d, expansion_factor=2.0),
        "MinLSTM": lambda: snn.MinLSTM(d, expansion_factor=2.0),
        "RGLRU": lambda: snn.RGLRU(d, d_rnn=d, num_heads=8),
        "LRU": lambda: snn.LRU(d, 256),
        "GatedDeltaNet": lambda: snn.GatedDeltaNet(hidden_size=d, head_dim=64, num_heads=4, num_v_heads=8),
        "DeltaNet": lambda: snn.DeltaNet(hidden_size=d, num_heads=4),
    }
    for name, mk in makers.items():
        try:
            torch.manual_seed(0)
            m = mk().to(DEV)
            x = torch.randn(B, T, d, device=DEV, requires_grad=True)

            def fb():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(x)
                y.float().square().mean().backward()

            fb()
            ok = torch.isfinite(x.grad).all().item() and all(
                p.grad is None or torch.isfinite(p.grad).all().item() for p in m.parameters())
            if not ok:
                FAILS.append(f"{name}: non-finite gradients at B={B} T={T} d={d}")
            ms = do_bench(fb, warmup=3, rep=30, return_mode="median")
            row("layers", f"B={B} T={T} d={d}", name, "fwd+bwd bf16 autocast", "bf16", round(ms, 3), "ms",
                "finite" if ok else "NON-FINITE")
            # decode steps vs parallel, fp32
            xs = torch.randn(2, Ts, d, device=DEV)
            with torch.no_grad():
                y = m(xs)
                cache = m.allocate_cache(2)
                steps = torch.stack([m.step(xs[:, t], cache) for t in range(Ts)], 1)
            e = rel_err(steps, y)
            row("layers", f"B=2 T={Ts} fp32", name, "step vs parallel", "fp32", f"{e:.2e}", "rel err",
                "ok" if e < 1e-2 else "FAIL")
            if not e < 1e-2:
                FAILS.append(f"{name}: step vs parallel rel err {e:.2e}")
        except Exception as e:
            traceback.print_exc()
            FAILS.append(f"{name} raised {type(e).__name__}: {e}")


# ---- (d) the recall example ----------------------------------------------------------------------

def recall():
    from ssm_kernels.examples import recall as rc
    t = time.time()
    args = ["--tiny"] if SMOKE else ["--dims", "64", "--steps", "150", "--seq-len", "128",
                                     "--pairs", "8", "--vocab", "256"]
    rows = rc.main(args + ["--out", os.environ.get("OUT") or "/tmp"])
    for r in rows:
        row("recall", f"d={r['d_model']} 150 steps L=128", r["mixer"], "accuracy", "bf16",
            r["accuracy"], "acc", f"{r['state_bytes']} state bytes, {r['seconds']} s")
    row("recall", "reduced run", "all mixers", "wall", "", round(time.time() - t, 1), "s")


def main():
    print(f"device {'cpu (SMOKE)' if SMOKE else torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}", flush=True)
    bw = None
    for name, fn in (("causal_conv1d checks", conv_checks), ("copy bandwidth", None),
                     ("causal_conv1d bench", "bench"), ("layers", layers), ("recall", recall)):
        if SECTIONS and name.split()[0] not in SECTIONS:
            continue
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            if fn is None:
                bw = copy_gbps()
                row("ceiling", "copy 1 GiB fp32", "torch", "", "fp32", round(bw), "GB/s")
            elif fn == "bench":
                conv_bench(bw or 4270.0)
            else:
                fn()
        except Exception as e:
            traceback.print_exc()
            FAILS.append(f"{name} raised {type(e).__name__}: {e}")
        print(f"   {time.time() - t:.0f} s", flush=True)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_layers.csv"), "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
            wr.writeheader()
            wr.writerows(ROWS)
    print("\n==== summary ====")
    checks = [r for r in ROWS if r["section"] == "check"]
    print(f"causal_conv1d checks: {len(checks)} compared, "
          f"{sum('FAIL' in r['note'] for r in checks)} failed")
    for r in ROWS:
        if r["section"] != "check":
            print(f"{r['section']:<11} {r['case']:<32} {r['impl']:<16} {r['mode']:<22} {r['dtype']:<5} "
                  f"{r['value']!s:>9} {r['unit']:<7} {r['note']}")
    print(f"\n{len(FAILS)} failures; total {time.time() - T0:.0f} s")
    for f in FAILS:
        print("  FAIL", f)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
