"""Localise the GPU-only dk error of chunk_linear_attn / chunk_simple_gla (session 3 probe).

For each variant of the dq/dk stage's launch (tiles, warps), compare dk against the float64
chunked reference, and split the kernel's dk into its two terms computed in torch from the same
stored states: the state term v_c dh_c^T and the intra-chunk term scale * sum_{i>=j} (do_i.v_j) q_i.
`python bench/gpu_dk_probe.py` on the GPU machine; prints one line per variant."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.chunk import bwd, common  # noqa: E402
from ssm_kernels.linear_attn.reference import linear_attn_chunk_ref  # noqa: E402


BACKEND = os.environ.get("PROBE_BACKEND")  # None: the default (triton on the GPU)


class Recorder:
    """Stands in for bwd._dqk_kernel: records the launch arguments, can override num_warps."""

    def __init__(self, kern):
        self.kern, self.args, self.warps = kern, None, None

    def __getitem__(self, grid):
        def launch(*a, **kw):
            if self.warps:
                kw["num_warps"] = self.warps
            self.args = a
            return self.kern[grid](*a, **kw)
        return launch


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(dtype, knobs, warps, with_dht, gated, T=512, H=2, K=128, V=128):
    torch.manual_seed(0)
    q, k = (torch.randn(2, 1, T, H, K, device="cuda") * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(1, T, H, V, device="cuda").to(dtype)
    g = (torch.nn.functional.logsigmoid(torch.randn(1, T, H, device="cuda")) / 16) if gated else None
    h0 = torch.randn(1, H, K, V, device="cuda")
    saved = {n: getattr(common, n) for n in knobs}
    rec = Recorder(bwd._dqk_kernel)
    bwd._dqk_kernel, rec.warps = rec, warps
    try:
        for n, x in knobs.items():
            setattr(common, n, x)
        ins = [x.clone().requires_grad_() for x in (q, k, v, h0)]
        if gated:
            o, ht = sk.chunk_simple_gla(ins[0], ins[1], ins[2], g, initial_state=ins[3], output_final_state=True,
                                       backend=BACKEND)
        else:
            o, ht = sk.chunk_linear_attn(ins[0], ins[1], ins[2], initial_state=ins[3], output_final_state=True,
                                         normalize=False, backend=BACKEND)
        do = torch.randn_like(o)
        dht = torch.randn_like(ht) if with_dht else torch.zeros_like(ht)
        dq, dk, dv, _ = torch.autograd.grad([o, ht], ins, [do, dht])
    finally:
        bwd._dqk_kernel = rec.kern
        for n, x in saved.items():
            setattr(common, n, x)
    ins2 = [x.double().requires_grad_() for x in (q, k, v, h0)]
    o2, ht2 = linear_attn_chunk_ref(ins2[0], ins2[1], ins2[2], None if g is None else g.double(), None, ins2[3],
                                    None, chunk_size=64)
    rq, rk, rv, _ = torch.autograd.grad([o2, ht2], ins2, [do.double(), dht.double()])
    # the kernel's dk split into its terms from its own stored h / dh (GATE 0 only)
    split = ""
    if not gated:
        h_st, dh_st = rec.args[7], rec.args[8]          # h, dh [NCH, H, K, V]
        BT = T // h_st.shape[0]
        scale = K ** -0.5
        vv, dd, qq = (x.double()[0].transpose(0, 1).reshape(H, -1, BT, x.shape[-1]) for x in (v, do, q))
        st = torch.einsum("hctv,chkv->hctk", vv, dh_st.double())
        Dm = torch.einsum("hciv,hcjv->hcij", dd, vv).tril()
        intra = scale * torch.einsum("hcij,hcik->hcjk", Dm, qq)
        dk_k = dk.double()[0].transpose(0, 1).reshape(H, -1, BT, K)
        rk_ = rk[0].transpose(0, 1).reshape(H, -1, BT, K)
        split = (f" | kernel dk vs torch(state+intra from its h,dh) {rel(dk_k, st + intra):.2e}"
                 f"; ref-state {rel(rk_ - intra, st):.2e}; BT={BT}")
    return f"dq {rel(dq, rq):.2e} dk {rel(dk, rk):.2e} dv {rel(dv, rv):.2e}" + split


def main():
    cases = [("bf16 default", torch.bfloat16, {}, None, True),
             ("bf16 warps=4", torch.bfloat16, {}, 4, True),
             ("bf16 BWD_CHUNK=32", torch.bfloat16, {"BWD_CHUNK": 32}, None, True),
             ("fp32 default", torch.float32, {}, None, True),
             ("fp16 default", torch.float16, {}, None, True)]
    for gated in (False, True):
        for name, dt, kn, w, dht in cases:
            try:
                r = run(dt, kn, w, dht, gated)
            except Exception as e:  # noqa: BLE001
                r = "error " + repr(e)[:150]
            print(f"{'simple_gla' if gated else 'linear_attn':11s} {name:18s} {r}", flush=True)
    timing()


def timing(B=4, T=4096, H=16, K=128):
    """fwd+bwd ms (do_bench median) with the backward at the forward's chunk and at 32."""
    from triton.testing import do_bench
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16)
    ops = {"linear_attn": lambda: sk.chunk_linear_attn(q, k, v, normalize=False)[0],
           "simple_gla": lambda: sk.chunk_simple_gla(q, k, v, g)[0]}
    for name, f in ops.items():
        for bc in (None, 32):
            common.BWD_CHUNK = bc
            o = f()
            do = torch.randn_like(o)
            ms = do_bench(lambda: torch.autograd.grad(f(), (q, k, v), do), warmup=5, rep=30)
            print(f"timing {name:11s} BWD_CHUNK={bc}: fwd+bwd {ms:.3f} ms", flush=True)
        common.BWD_CHUNK = None


if __name__ == "__main__":
    main()
