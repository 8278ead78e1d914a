"""SCAN_T's precision at long T, emulated in torch on the CPU (no GPU, no interpreter): the forward
of the chunked delta rule as the GPU runs it for bf16 inputs (BT = 64; tensor-core operand roundings
emulated: tf32 = 10 mantissa bits, round to nearest; bf16 operands; float32 accumulation), in
the default form (the WY stage writes float32 W = T' K, U = T'' V with T split hi + lo in bf16;
the scan forms V' = U - tf32(W) tf32(S)) and in SCAN_T's (the scan forms V' = tf32(T) tf32(Y),
Y = diag(beta) v - diag(beta e^G r) (k (S_hi + S_lo)), S split in two bf16 pieces, k raw), both
against the float64 chunked WY form (= the recurrence up to float64 rounding). The output stage
and the state update are the same for both (bf16 operands as on the GPU: h, V', q e^G, decayed k
rounded to bf16). Prints the relative (Frobenius) error of o and of the final state per T.

    PYTHONPATH=$PWD python bench/delta_scan_t_precision.py [--T 1024,4096,16384,65536] [--H 4]
        [--gated 1,0] [--seed 0]

--interp: instead, the op itself under the Triton interpreter (TRITON_INTERPRET=1; float16 at the
GPU's tiles, BT = 64 and 16-bit dots, B1 H1 HV2 K=V=32, L2 norm in-kernel, no-grad forward),
default and SCAN_T, o and the final state against the float64 recurrence.

What it does not emulate: the order of the float32 accumulations inside a dot (an error of ~K
ulps of float32, far below the tf32 / bf16 operand roundings it models) and the inverse's own
tf32 rounding pattern beyond the operand roundings of its dots.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

BT = 64


def tf32(x):
    """Round float32 to tf32 (10 explicit mantissa bits), to nearest even."""
    x = x.float().contiguous()
    i = x.view(torch.int32)
    i = (i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32)


def bf(x):
    return x.to(torch.bfloat16).float()


def mm32(a, b):
    """float32 accumulation of already-rounded operands (products exact in float64 first)."""
    return (a.double() @ b.double()).float()


def inverse(A, emulate):
    """(I + A)^-1 of a strictly lower [.., BT, BT] A by recursive doubling (as _wy_fast_kernel):
    X <- X - mask(X A) X, its dots in tf32 when emulating, else float64."""
    n = A.shape[-1]
    o = torch.arange(n)
    eye = (o[:, None] == o[None, :]).to(A.dtype)
    pair = (o // 2)[:, None] == (o // 2)[None, :]
    X = eye - torch.where(pair, A, torch.zeros_like(A))
    lv = 2
    while (1 << (lv - 1)) < n:
        blk = o >> (lv - 1)
        sub = ((blk % 2) == 1)[:, None] & (blk[None, :] == (blk - 1)[:, None])
        if emulate:
            XA = mm32(tf32(X), tf32(A))
            X = X - mm32(tf32(torch.where(sub, XA, torch.zeros_like(XA))), tf32(X))
        else:
            XA = X @ A
            X = X - torch.where(sub, XA, torch.zeros_like(XA)) @ X
        lv += 1
    return X


def forward(q, k, v, g, beta, mode):
    """o [H, T, V], final S [H, K, V]. mode: 'ref' (float64), 'default', 'scan_t'. q, k, v bf16
    [H, T, D]; g float32 [H, T] (log-decay per step, or zeros), beta float32 [H, T]; L2 norm of
    q, k in-kernel; scale K^-0.5."""
    H, T, K = k.shape
    V = v.shape[-1]
    ref = mode == "ref"
    dt = torch.float64 if ref else torch.float32
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    r_k = 1. / torch.sqrt((kf * kf).sum(-1) + 1e-6)
    r_q = 1. / torch.sqrt((qf * qf).sum(-1) + 1e-6)
    scale = K ** -0.5
    S = torch.zeros(H, K, V, dtype=dt)
    o = torch.empty(H, T, V, dtype=dt)
    strict = torch.tril(torch.ones(BT, BT, dtype=torch.bool), -1)
    causal = torch.tril(torch.ones(BT, BT, dtype=torch.bool))
    for c0 in range(0, T, BT):
        sl = slice(c0, min(c0 + BT, T))
        n = sl.stop - sl.start
        kc, vc, qc = kf[:, sl], vf[:, sl], qf[:, sl]
        rk, rq = r_k[:, sl], r_q[:, sl]
        G = torch.cumsum(g[:, sl].to(dt) / math.log(2), -1)          # log2 units
        b = beta[:, sl].to(dt)
        st = strict[:n, :n]
        KK = kc @ kc.transpose(1, 2)                                   # bf16 dot: exact products
        dG = G[:, :, None] - G[:, None, :]
        A = torch.where(st, b[:, :, None] * rk[:, :, None] * KK * rk[:, None, :]
                        * torch.exp2(torch.where(st, dG, torch.zeros_like(dG))),
                        torch.zeros_like(KK))
        X = inverse(A, not ref)                                        # T (shared by both forms)
        be = b * torch.exp2(G) * rk
        if ref:
            U = X @ (b[:, :, None] * vc)
            W = X @ (be[:, :, None] * kc)
            vn = U - W @ S
        elif mode == "default":
            def hilo(a, x):                    # T split hi + lo bf16 against an exact bf16 side
                hi = bf(a)
                return mm32(hi, x) + mm32(bf(a - hi), x)
            U = hilo(X * b[:, None, :], vc)
            W = hilo(X * be[:, None, :], kc)
            vn = U - mm32(tf32(W), tf32(S))
        else:   # scan_t with KS_X2: k raw (exact) against S = hi + lo bf16; then tf32 T Y
            S_hi = bf(S)
            kS = (mm32(kc, S_hi) + mm32(kc, bf(S - S_hi))) * rk[:, :, None]
            Y = vc * b[:, :, None] - kS * (b * torch.exp2(G))[:, :, None]
            vn = mm32(tf32(X), tf32(Y))
        # output (the same stage for both): q e^G h + causal(q k^T e^(G_i - G_j)) V'
        Gl = G[:, -1]
        if ref:
            h, vn16 = S, vn
            qe = qc * (rq * torch.exp2(G))[:, :, None]
            kh = kc * rk[:, :, None]
            att = torch.where(causal[:n, :n], (qc * rq[:, :, None]) @ kh.transpose(1, 2)
                              * torch.exp2(torch.where(causal[:n, :n], dG, torch.zeros_like(dG))),
                              torch.zeros_like(dG))
            o[:, sl] = scale * (qe @ h + att @ vn16)
            kd = kh * torch.exp2(Gl[:, None] - G)[:, :, None]
            S = torch.exp2(Gl)[:, None, None] * S + kd.transpose(1, 2) @ vn16
        else:
            h, vn16 = bf(S), bf(vn)
            qe = bf(qc * (rq * torch.exp2(G))[:, :, None])
            att = mm32(qc, kc.transpose(1, 2)) * (rq[:, :, None] * rk[:, None, :])
            att = torch.where(causal[:n, :n], att * torch.exp2(
                torch.where(causal[:n, :n], dG, torch.zeros_like(dG))), torch.zeros_like(att))
            o[:, sl] = scale * (mm32(qe, h) + mm32(bf(att), vn16))
            kd = bf(kc * (rk * torch.exp2(Gl[:, None] - G))[:, :, None])
            S = torch.exp2(Gl)[:, None, None] * S + mm32(kd.transpose(1, 2), vn16)
    return o, S


def rel(a, r):
    return (torch.linalg.vector_norm(a.double() - r) / torch.linalg.vector_norm(r)).item()


def interp_main(Ts, gateds):
    """The op under the interpreter (see the module doc)."""
    import os
    import sys
    import time
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    from test_delta_rule import make
    import ssm_kernels as sk
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.delta_rule.reference import delta_rule_recurrent_ref
    from ssm_kernels.testing import rel_err
    common.triton_interpret = lambda: False   # BT = 64, 16-bit tensor-core-style dots
    torch.manual_seed(0)
    print("| gated | T | o default | o scan_t | S default | S scan_t | s |")
    print("|---|---|---|---|---|---|---|")
    for T in Ts:
        for gated in gateds:
            q, k, v, g, beta = make(1, T, 1, 2, 32, 32, gated, unit_keys=False,
                                    dtype=torch.float16)
            d = lambda x: None if x is None else x.double()  # noqa: E731
            t0 = time.time()
            ro, rS = delta_rule_recurrent_ref(d(q), d(k), d(v), d(g), d(beta), None, None, None,
                                              True)
            res = []
            for st in (False, True):
                wy.SCAN_T = st
                kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True, backend="triton")
                with torch.no_grad():
                    o, S = (sk.chunk_gated_delta_rule(q, k, v, g, beta, **kw) if gated
                            else sk.chunk_delta_rule(q, k, v, beta, **kw))
                res.append((rel_err(o, ro), rel_err(S, rS)))
            print(f"| {int(gated)} | {T} | {res[0][0]:.3e} | {res[1][0]:.3e} | {res[0][1]:.3e} | "
                  f"{res[1][1]:.3e} | {time.time() - t0:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--interp", action="store_true", help="the op under the Triton interpreter")
    ap.add_argument("--T", default="1024,4096,16384")
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--gated", default="1,0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.interp:
        return interp_main([int(x) for x in args.T.split(",")],
                           [bool(int(x)) for x in args.gated.split(",")])
    print("| gated | T | o default | o scan_t | S default | S scan_t |")
    print("|---|---|---|---|---|---|")
    for gated in [bool(int(x)) for x in args.gated.split(",")]:
        for T in [int(x) for x in args.T.split(",")]:
            gen = torch.Generator().manual_seed(args.seed)
            H, K = args.H, args.K
            q, k, v = (torch.randn(H, T, K, generator=gen).to(torch.bfloat16) for _ in range(3))
            # fla's benchmark gate: logsigmoid of a normal (mean step decay e^-0.8), beta sigmoid
            g = (F.logsigmoid(torch.randn(H, T, generator=gen)) if gated
                 else torch.zeros(H, T))
            beta = torch.sigmoid(torch.randn(H, T, generator=gen))
            o_r, S_r = forward(q, k, v, g, beta, "ref")
            o_d, S_d = forward(q, k, v, g, beta, "default")
            o_t, S_t = forward(q, k, v, g, beta, "scan_t")
            print(f"| {int(gated)} | {T} | {rel(o_d, o_r):.3e} | {rel(o_t, o_r):.3e} | "
                  f"{rel(S_d, S_r):.3e} | {rel(S_t, S_r):.3e} |", flush=True)


if __name__ == "__main__":
    main()
