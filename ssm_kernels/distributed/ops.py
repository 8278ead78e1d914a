"""Context parallelism for each public op: its tensors, local call and decay product, handed to
`context_parallel`. Adding an op is one function here plus the early return in its interface."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _check_group, context_parallel

# ---- the ops -------------------------------------------------------------------------------------

def cp_linear_scan(a, b, initial_state=None, *, dim=1, reverse=False, output_final_state=False,
                   backend=None, process_group=None):
    """`linear_scan` over a sequence split along `dim` across `process_group`. Summary: the op
    from zero; correction: rerun with the true initial state."""
    from ..linear_scan.interface import linear_scan
    from ..linear_scan.reference import state_dtype
    _check_group("linear_scan", process_group)

    def local(x, h0):
        h, fin = linear_scan(x["a"], x["b"], h0[0], dim=dim, reverse=reverse,
                             output_final_state=True, backend=backend)
        return h, (fin,)

    def decays(x):
        return (torch.prod(x["a"].to(state_dtype(a.dtype)), dim=dim),)

    h, (final,) = context_parallel("linear_scan", process_group,
                                   {"a": a, "b": b, "h0": initial_state}, local=local,
                                   decays=decays, h0_keys=("h0",), reverse=bool(reverse))
    return (h, final) if output_final_state else h


def cp_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, initial_state=None, cu_seqlens=None,
                         backend=None, process_group=None):
    """`selective_scan_fn` over a sequence split along seqlen. Summary: the op from zero without
    D and z; correction: rerun with the true initial state."""
    from ..selective_scan.interface import selective_scan_fn
    from ..selective_scan.reference import compute_dtype
    _check_group("selective_scan_fn", process_group, cu_seqlens)

    def run(x, h0, with_out):
        out, last = selective_scan_fn(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if with_out else None,
            x["z"] if with_out else None, x["delta_bias"], delta_softplus, True,
            initial_state=h0, backend=backend)
        return out, (last,)

    def decays(x):
        cd = compute_dtype(u, delta, A)
        dt = x["delta"].to(cd)
        if delta_bias is not None:
            dt = dt + x["delta_bias"].to(cd)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        At = x["A"]
        At = At.to(torch.complex128 if cd == torch.float64 else torch.complex64) if At.is_complex() \
            else At.to(cd)
        return (torch.exp(dt.sum(-1)[..., None] * At),)     # (batch, dim, dstate)

    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
              "delta_bias": delta_bias, "h0": initial_state}
    out, (last,) = context_parallel(
        "selective_scan_fn", process_group, inputs, local=lambda x, h0: run(x, h0[0], True),
        decays=decays, h0_keys=("h0",), summarize=lambda x: run(x, None, False)[1])
    return (out, last) if return_last_state else out


def _la_state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _la_gate(x, sd):
    """Per-step log-decay [B, T, H] or [B, T, H, K] in sd, or None (no decay)."""
    g, gam = x.get("g"), x.get("g_gamma")
    if g is None and gam is None:
        return None
    G = g.to(sd) if g is not None else x["k"].new_zeros(x["k"].shape[:3], dtype=sd)
    return G if gam is None else G + gam.to(sd)


def _la_summary(x):
    """The end state of a segment from zero, ``S = sum_t (k_t * exp(sum_{s>t} g_s))^T v_t``: one
    matmul instead of the chunked op (no intra-chunk attention, no outputs)."""
    k, v = x["k"], x["v"]
    sd = _la_state_dtype(k)
    kf = k.to(sd)
    G = _la_gate(x, sd)
    if G is not None:
        # sum_{s>t} g_s, an exclusive reverse cumsum taken directly (no difference of long sums)
        rev = G.flip(1).cumsum(1).flip(1)
        w = torch.exp(torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1))
        kf = kf * (w if G.dim() == 4 else w[..., None])
    return (torch.einsum("bthk,bthv->bhkv", kf, v.to(sd)),)


def _la_adjoint(scale):
    """dL/dS_in through the outputs alone, ``sum_t scale (q_t * exp(sum_{s<=t} g_s))^T do_t``: one
    matmul instead of a backward pass of the chunked op."""
    def adjoint(x, do):
        q = x["q"]
        sd = _la_state_dtype(q)
        s = q.shape[-1] ** -0.5 if scale is None else float(scale)
        qf = q.detach().to(sd) * s
        G = _la_gate({k: (None if t is None else t.detach()) for k, t in x.items()}, sd)
        if G is not None:
            w = torch.exp(G.cumsum(1))
            qf = qf * (w if G.dim() == 4 else w[..., None])
        return (torch.einsum("bthk,bthv->bhkv", qf, do.to(sd)),)
    return adjoint


def cp_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, *, backend=None,
                        process_group=None):
    """`chunk_simple_gla` over a sequence split along T. Summary and adjoint summary: one matmul
    each; correction: rerun with the true initial state."""
    from ..linear_attn.interface import _validate, _validate_gamma, chunk_simple_gla
    _check_group("chunk_simple_gla", process_group, cu_seqlens)
    _validate("chunk_simple_gla", q, k, v, g, "head", scale, initial_state, None)
    _validate_gamma("chunk_simple_gla", g_gamma, q)

    def local(x, h0):
        o, ht = chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], scale, h0[0], True,
                                 backend=backend)
        return o, (ht,)

    def decays(x):
        G = _la_gate(x, _la_state_dtype(q))
        return (None,) if G is None else (torch.exp(G.sum(1))[:, :, None, None],)  # [B, H, 1, 1]

    inputs = {"q": q, "k": k, "v": v, "g": g, "g_gamma": g_gamma, "h0": initial_state}
    o, (ht,) = context_parallel("chunk_simple_gla", process_group, inputs, local=local,
                                decays=decays, h0_keys=("h0",), summarize=_la_summary,
                                adjoint=_la_adjoint(scale))
    return o, (ht if output_final_state else None)


def cp_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_gla` over a sequence split along T. Summary and adjoint summary: one matmul each;
    correction: rerun with the true initial state."""
    from ..linear_attn.interface import _validate, chunk_gla
    _check_group("chunk_gla", process_group, cu_seqlens)
    if g is None:
        raise ValueError("chunk_gla: g ([B, T, H, K] log-decays) is required")
    _validate("chunk_gla", q, k, v, g, "key", scale, initial_state, None)

    def local(x, h0):
        o, ht = chunk_gla(x["q"], x["k"], x["v"], x["g"], scale, h0[0], True, backend=backend)
        return o, (ht,)

    def decays(x):
        return (torch.exp(x["g"].to(_la_state_dtype(q)).sum(1))[..., None],)   # [B, H, K, 1]

    o, (ht,) = context_parallel("chunk_gla", process_group,
                                {"q": q, "k": k, "v": v, "g": g, "h0": initial_state},
                                local=local, decays=decays, h0_keys=("h0",),
                                summarize=_la_summary, adjoint=_la_adjoint(scale))
    return o, (ht if output_final_state else None)


def cp_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                         normalize=True, cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_linear_attn` over a sequence split along T. No decay (A = 1); with normalize the
    running key sum is a second state in the same exchange and the normalisation runs inside the
    local step. Summary: one matmul; correction: rerun with the true initial state."""
    from ..linear_attn.interface import _validate, chunk_linear_attn
    from ..validation import check_tensor
    _check_group("chunk_linear_attn", process_group, cu_seqlens)
    if normalize and isinstance(initial_state, (tuple, list)):
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    _validate("chunk_linear_attn", q, k, v, None, "head", scale, kv0, None)
    inputs = {"q": q, "k": k, "v": v, "h0": kv0}

    if not normalize:
        def local(x, h0):
            o, ht = chunk_linear_attn(x["q"], x["k"], x["v"], scale, h0[0], True, normalize=False,
                                      backend=backend)
            return o, (ht,)

        o, (ht,) = context_parallel("chunk_linear_attn", process_group, inputs, local=local,
                                    decays=lambda x: (None,), h0_keys=("h0",),
                                    summarize=_la_summary, adjoint=_la_adjoint(scale))
        return o, (ht if output_final_state else None)

    if z0 is not None:
        check_tensor("chunk_linear_attn", "initial_state[1] (z_state)", z0)
        if tuple(z0.shape) != (q.shape[0], 1, q.shape[2], q.shape[3]):
            raise ValueError(f"chunk_linear_attn: initial_state[1] (z_state) must have shape "
                             f"[N, 1, H, K] = {(q.shape[0], 1, q.shape[2], q.shape[3])}, got "
                             f"{tuple(z0.shape)}")
    sd = _la_state_dtype(q)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def local(x, h0):
        o, ht = chunk_linear_attn(x["q"], x["k"], x["v"], scale, h0[0], True, normalize=False,
                                  backend=backend)
        kf = x["k"].to(sd)
        kc = kf.cumsum(1)
        zsum = kc[:, -1:]                                     # [B, 1, H, K]
        if h0[1] is not None:
            kc = kc + h0[1].to(sd)
            zsum = zsum + h0[1].to(sd)
        denom = (x["q"].to(sd) * s * kc).sum(-1, keepdim=True) + 1e-10
        return (o.to(sd) / denom).to(v.dtype), (ht, zsum)

    def summarize(x):
        return _la_summary(x) + (x["k"].to(sd).sum(1, keepdim=True),)

    o, (ht, z) = context_parallel("chunk_linear_attn", process_group, {**inputs, "z0": z0},
                                  local=local, decays=lambda x: (None, None),
                                  h0_keys=("h0", "z0"), summarize=summarize)
    return o, ((ht, z) if output_final_state else None)


def cp_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                 initial_states=None, seq_idx=None, cu_seqlens=None,
                                 dt_softplus=False, dt_limit=(0.0, float("inf")),
                                 return_final_states=False, return_varlen_states=False, *,
                                 backend=None, process_group=None):
    """`mamba_chunk_scan_combined` (SSD) over a sequence split along seqlen. Decay per head:
    ``exp(A_h sum_t dt_t)`` on the processed dt; summary: the op from zero without D and z;
    correction: rerun with the true initial states."""
    from ..ssd.interface import mamba_chunk_scan_combined
    from ..ssd.reference import process_dt
    op = "mamba_chunk_scan_combined"
    _check_group(op, process_group, cu_seqlens)
    if seq_idx is not None or return_varlen_states:
        raise ValueError(f"{op}: seq_idx / return_varlen_states (packed sequences) cannot be "
                         f"combined with process_group (context parallelism)")

    def run(xs, h0, with_out):
        return mamba_chunk_scan_combined(
            xs["x"], xs["dt"], xs["A"], xs["B"], xs["C"], chunk_size,
            D=xs["D"] if with_out else None, z=xs["z"] if with_out else None,
            dt_bias=xs["dt_bias"], initial_states=h0, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=True, backend=backend)

    def local(xs, h0):
        y, fin = run(xs, h0[0], True)
        return y, (fin,)

    def decays(xs):
        dtp = process_dt(xs["dt"], xs["dt_bias"], dt_softplus, dt_limit)      # (b, l, h)
        return (torch.exp(dtp.sum(1) * xs["A"].to(dtp.dtype))[:, :, None, None],)  # (b, h, 1, 1)

    inputs = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
              "h0": initial_states}
    y, (fin,) = context_parallel(op, process_group, inputs, local=local, decays=decays,
                                 h0_keys=("h0",), summarize=lambda xs: (run(xs, None, False)[1],))
    return (y, fin) if return_final_states else y
