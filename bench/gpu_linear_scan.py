"""linear_scan in accelerated-scan's [B, D, T] layout (B=8, D=1536, T 4096 / 16384, fp32 / bf16).

Default (A/B of the backward, ~100-150 s warm): the backward kernels side by side, each checked
against the float64 reference (`linear_scan_bwd_ref` on 256 rows) and timed alone (the launcher,
no autograd): `old` = _linear_scan_bwd_kernel (shifted loads), `reg` = the register-shift kernel
(BWD_REG_SHIFT, default tiles), `reg+pf` = the same with BWD_PREFETCH, then `reg`/`reg+pf` over a
few tile shapes. Then forward and forward+backward through autograd, eager and (where capture
works) CUDA-graph replay, for old / reg / reg+pf and accelerated-scan. Last: one table.

    python bench/gpu_linear_scan.py            # the A/B
    python bench/gpu_linear_scan.py --sweep    # session 2's forward/backward tile sweep
    python bench/gpu_linear_scan.py --quick    # T=4096 only
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.benchmarks.peers import accelerated_scan  # noqa: E402
from ssm_kernels.linear_scan import triton as K  # noqa: E402
from ssm_kernels.linear_scan.reference import linear_scan_bwd_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402
from gpu_decode import replay_us  # noqa: E402  (bench/ is on the path: the script's folder)

ORIG = K._config
VARIANTS = [(16, 128, 4), (8, 256, 4), (4, 512, 4), (4, 1024, 8), (2, 1024, 4), (2, 2048, 8),
            (1, 1024, 4), (1, 2048, 4), (1, 4096, 8)]
# backward tiles (BLOCK_C, BLOCK_T, warps) tried for the register-shift kernel
BWD_TILES = [(1, 1024, 4), (1, 2048, 4), (2, 1024, 4), (2, 2048, 8), (4, 1024, 8), (1, 4096, 8)]
B, D = 8, 1536
DEV = os.environ.get("LSCAN_BENCH_DEVICE", "cuda")   # "cpu" + TRITON_INTERPRET=1: a smoke run


def use(cfg):
    K._plan.cache_clear()
    if cfg is None:
        K._config = ORIG
    else:
        bc, bt, w = cfg
        K._config = lambda T, C, time_inner, cplx, eb, bwd=False: (
            dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=w) if time_inner else ORIG(T, C, time_inner, cplx, eb, bwd))


def knobs(name):
    """old / reg / reg+pf -> (BWD_REG_SHIFT, BWD_PREFETCH)."""
    K.BWD_REG_SHIFT, K.BWD_PREFETCH = {"old": (False, False), "reg": (True, False),
                                       "reg+pf": (True, True)}[name]
    K._plan.cache_clear()   # the 16-bit backward's default tile depends on BWD_REG_SHIFT


def ms(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def ms_graph(fn):
    """GPU time of fn replayed from a CUDA graph (no host cost); nan when capture fails."""
    try:
        return replay_us(fn, calls=4) / 1e3
    except Exception as e:  # noqa: BLE001 - a peer or path that cannot be captured
        print(f"  graph capture failed: {type(e).__name__} {str(e)[:80]}")
        torch.cuda.synchronize()
        return float("nan")


def ab(Ts):
    peer = accelerated_scan()
    rows, bwd_rows = [], []
    for T in Ts:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            a = (torch.rand(B, D, T, device=DEV) * 0.5 + 0.5).to(dtype)
            b = torch.randn(B, D, T, device=DEV).to(dtype)
            dh = torch.randn(B, D, T, device=DEV).to(dtype)
            P, es, n = B * D, a.element_size(), B * D * T
            use(None)
            h, _ = K.linear_scan_fwd(a, b, None, False, pq=(P, T, 1))
            # float64 reference on 256 rows (the kernels treat every row alike)
            r = min(256, P)
            a3, h3, d3 = (x.view(P, T, 1)[:r] for x in (a, h, dh))
            zero = torch.zeros(r, 1, dtype=torch.float64, device=DEV)
            ref = linear_scan_bwd_ref(a3.double(), h3.double(), None, d3.double(), zero, False)
            lowp = (linear_scan_bwd_ref(a3, h3, None, d3, zero.float(), False)
                    if dtype == torch.bfloat16 else (None, None))
            cases = [("old", None), ("reg", None), ("reg+pf", None)]
            cases += [(k, cfg) for cfg in BWD_TILES for k in ("reg", "reg+pf")]
            cases = cases[:int(os.environ.get("LSCAN_BWD_CASES", len(cases)))]
            tag = f"T={T} {str(dtype)[6:]}"
            for name, cfg in cases:
                knobs(name)
                use(cfg)
                try:
                    da, db, _ = K.linear_scan_bwd(a, h, None, dh, None, False, pq=(P, T, 1))
                    ok = []
                    for i, (x, nm) in enumerate(((da, "da"), (db, "db"))):
                        v = compare(nm, x.view(P, T, 1)[:r], ref[i], dtype, lowp[i])
                        ok.append(f"{nm} {v.err:.1e}{'' if v.ok else ' FAIL'}")
                    t = ms(lambda: K.linear_scan_bwd(a, h, None, dh, None, False, pq=(P, T, 1)))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile / launch
                    print(f"{tag} bwd {name} {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    continue
                tbs = 5 * n * es / t / 1e9
                print(f"{tag} bwd {name:<7} {str(cfg):<16} {t:.4f} ms {tbs:6.0f} GB/s  {'  '.join(ok)}",
                      flush=True)
                bwd_rows.append((T, str(dtype)[6:], name, cfg, t, tbs))
            use(None)
            al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()

            def fb(f):
                def run():
                    out = f(al, bl)
                    torch.autograd.grad(out, (al, bl), dh)
                return run
            ours = lambda x, y: sk.linear_scan(x, y, dim=-1, backend="triton")  # noqa: E731
            res = {}
            for name in ("old", "reg", "reg+pf"):
                knobs(name)
                res[name] = (ms(lambda: ours(a, b)), ms(fb(ours)), ms_graph(fb(ours)))
            knobs("reg")
            if peer is not None:
                res["acc-scan"] = (ms(lambda: peer(a, b)), ms(fb(peer)), ms_graph(fb(peer)))
            for name, (tf, tb, tg) in res.items():
                print(f"{tag} {name:<8} fwd {tf:.4f}  fwd+bwd eager {tb:.4f}  graph {tg:.4f} ms", flush=True)
                rows.append((T, str(dtype)[6:], name, tf, tb, tg, 3 * n * es, 8 * n * es))
    # best register-shift backward per (T, dtype) vs old
    print(f"\n{'T':>6} {'dtype':<9} {'bwd kernel':<10} {'tile':<16} {'ms':>8} {'GB/s':>6}")
    for T in Ts:
        for dt in ("float32", "bfloat16"):
            sel = [x for x in bwd_rows if x[0] == T and x[1] == dt]
            for name in ("old", "reg", "reg+pf"):
                cand = [x for x in sel if x[2] == name]
                if cand:
                    best = min(cand, key=lambda x: x[4])
                    print(f"{T:>6} {dt:<9} {name:<10} {str(best[3]):<16} {best[4]:8.4f} {best[5]:6.0f}")
    print(f"\n{'T':>6} {'dtype':<9} {'path':<8} {'fwd ms':>8} {'f+b eager':>9} {'f+b graph':>9} "
          f"{'fwd TB/s':>8} {'f+b TB/s':>8} {'acc/ours':>8}  (f+b TB/s and acc/ours from graph times; 8n)")
    peer_g = {(T, dt): tg for T, dt, name, tf, tb, tg, nf, nb in rows if name == "acc-scan"}
    for T, dt, name, tf, tb, tg, nf, nb in rows:
        print(f"{T:>6} {dt:<9} {name:<8} {tf:8.4f} {tb:9.4f} {tg:9.4f} {nf / tf / 1e9:8.2f} "
              f"{nb / tg / 1e9:8.2f} {peer_g.get((T, dt), float('nan')) / tg:8.2f}")


def sweep():
    peer = accelerated_scan()
    rows = []
    for T in (4096, 16384):
        for dtype in (torch.float32, torch.bfloat16):
            a = (torch.rand(B, D, T, device=DEV) * 0.5 + 0.5).to(dtype)
            b = torch.randn(B, D, T, device=DEV).to(dtype)
            al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
            es = a.element_size()
            n = B * D * T

            def fb(f):
                def run():
                    h = f(al, bl)
                    torch.autograd.grad(h, (al, bl), bl)
                return run
            ours = lambda x, y: sk.linear_scan(x, y, dim=-1)  # noqa: E731
            ref_h = sk.linear_scan(a.float(), b.float(), dim=-1, backend="triton")
            best = {}
            for cfg in [None] + VARIANTS:
                use(cfg)
                try:
                    h = ours(a, b)
                    err = ((h.float() - ref_h).norm() / ref_h.norm()).item()
                    tf, tb = ms(lambda: ours(a, b)), ms(fb(ours))
                except Exception as e:  # a tile that does not compile (shared memory) is skipped
                    print(f"T={T} {dtype} cfg={cfg}: {type(e).__name__} {str(e)[:80]}")
                    continue
                print(f"T={T} {str(dtype)[6:]:<8} cfg={cfg}: fwd {tf:.4f} ms  fwd+bwd {tb:.4f} ms  err {err:.1e}",
                      flush=True)
                for mode, t in (("fwd", tf), ("fwd+bwd", tb)):
                    if mode not in best or t < best[mode][0]:
                        best[mode] = (t, cfg)
            use(None)
            pf = ms(lambda: peer(a, b)) if peer else float("nan")
            pb = ms(fb(peer)) if peer else float("nan")
            for mode, p, nb in (("fwd", pf, 3 * n * es), ("fwd+bwd", pb, 8 * n * es)):
                t, cfg = best[mode]
                rows.append((T, str(dtype)[6:], mode, t, cfg, p, nb))
    print(f"\n{'T':>6} {'dtype':<9} {'mode':<8} {'ours ms':>8} {'best cfg':<16} {'acc-scan':>9} {'ratio':>6} {'TB/s':>6}")
    for T, dt, mode, t, cfg, p, nb in rows:
        print(f"{T:>6} {dt:<9} {mode:<8} {t:8.4f} {str(cfg):<16} {p:9.4f} {p / t:6.2f} {nb / t / 1e9:6.2f}")


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        sweep()
    else:
        ab((4096,) if "--quick" in sys.argv else (4096, 16384))
