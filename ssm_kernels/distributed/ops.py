"""Context parallelism for each public op: its tensors, local call and decay product, handed to
`context_parallel`. Adding an op is one function here plus the early return in its interface."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _check_group, _solo, context_parallel

# ---- the ops -------------------------------------------------------------------------------------

def _triton_ok(chosen: str, x) -> bool:
    """Whether the states-only Triton passes serve a call whose op runs on `chosen`: on the GPU
    for the triton and cuda backends; on the CPU only where triton was asked for (interpreter)."""
    if chosen == "triton":
        return True
    if chosen != "cuda":
        return False
    from .. import _backend
    return _backend.triton_reason(x.device) is None


def cp_linear_scan(a, b, initial_state=None, *, dim=1, reverse=False, output_final_state=False,
                   backend=None, process_group=None):
    """`linear_scan` over a sequence split along `dim` across `process_group`. Summary: the
    kernel's states-only pass (product of a, end state from zero: reads a and b once); adjoint:
    its states-only backward pass (reads a and dout once)."""
    from .. import _backend
    from ..linear_scan.interface import _select, linear_scan
    from ..linear_scan.reference import state_dtype
    _check_group("linear_scan", process_group)
    if _solo(process_group):
        return linear_scan(a, b, initial_state, dim=dim, reverse=reverse,
                           output_final_state=output_final_state, backend=backend)
    d = dim % a.dim() if isinstance(dim, int) and -a.dim() <= dim < a.dim() else dim
    state_shape = a.shape[:d] + a.shape[d + 1:] if isinstance(d, int) else None

    def local(x, h0):
        h, fin = linear_scan(x["a"], x["b"], h0[0], dim=dim, reverse=reverse,
                             output_final_state=True, backend=backend)
        return h, (fin,)

    def canon(t):   # the kernels' [P, T, Q]
        return t.contiguous().view(a.shape[:d].numel(), t.shape[d], a.shape[d + 1:].numel())

    def use_triton(t):
        return _triton_ok(_select(_backend.normalize(backend), canon(t)), t)

    def summary(x):
        if use_triton(x["b"]):
            from ..linear_scan.triton import linear_scan_summary
            A, hT = linear_scan_summary(canon(x["a"]), canon(x["b"]), bool(reverse))
            return (A.view(state_shape),), (hT.view(state_shape),)
        _, fin = linear_scan(x["a"], x["b"], dim=dim, reverse=reverse, output_final_state=True,
                             backend=backend)
        return (torch.prod(x["a"].to(state_dtype(a.dtype)), dim=d),), (fin,)

    def adjoint(x, dout):
        if use_triton(dout):
            from ..linear_scan.triton import linear_scan_adjoint
            return (linear_scan_adjoint(canon(x["a"]), canon(dout), bool(reverse))
                    .view(state_shape),)
        # g_t = dout_t + conj(a[t_next]) g[t_next] is a scan against the forward's direction with
        # the decays shifted by one step; mu = conj(a at the first step) g there
        ac = x["a"].conj()
        T = a.shape[d]
        one = torch.ones_like(ac.narrow(d, 0, 1))
        if reverse:
            c = torch.cat([one, ac.narrow(d, 0, T - 1)], d)
        else:
            c = torch.cat([ac.narrow(d, 1, T - 1), one], d)
        _, g0 = linear_scan(c, dout.to(c.dtype), dim=dim, reverse=not reverse,
                            output_final_state=True, backend=backend)
        return (ac.select(d, T - 1 if reverse else 0).to(g0.dtype) * g0,)

    h, (final,) = context_parallel("linear_scan", process_group,
                                   {"a": a, "b": b, "h0": initial_state}, local=local,
                                   summary=summary, decay_shapes=(state_shape,),
                                   h0_keys=("h0",), reverse=bool(reverse), adjoint=adjoint)
    return (h, final) if output_final_state else h


def cp_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, initial_state=None, cu_seqlens=None,
                         backend=None, process_group=None):
    """`selective_scan_fn` over a sequence split along seqlen. Summary (later ranks): the op from
    zero without D and z, and exp(A sum_t delta_t); adjoint: a backward of the op."""
    from ..selective_scan.interface import selective_scan_fn
    from ..selective_scan.reference import compute_dtype
    _check_group("selective_scan_fn", process_group, cu_seqlens)
    if _solo(process_group):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state, initial_state=initial_state, backend=backend)

    def run(x, h0, with_out):
        out, last = selective_scan_fn(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if with_out else None,
            x["z"] if with_out else None, x["delta_bias"], delta_softplus, True,
            initial_state=h0, backend=backend)
        return out, (last,)

    def summary(x):
        cd = compute_dtype(u, delta, A)
        if delta_bias is None and not delta_softplus:
            dts = x["delta"].sum(-1, dtype=cd)
        else:
            dt = x["delta"].to(cd)
            if delta_bias is not None:
                dt = dt + x["delta_bias"].to(cd)[:, None]
            dts = (F.softplus(dt) if delta_softplus else dt).sum(-1)
        At = x["A"]
        At = At.to(torch.complex128 if cd == torch.float64 else torch.complex64) if At.is_complex() \
            else At.to(cd)
        return (torch.exp(dts[..., None] * At),), run(x, None, False)[1]  # (batch, dim, dstate)

    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
              "delta_bias": delta_bias, "h0": initial_state}
    out, (last,) = context_parallel(
        "selective_scan_fn", process_group, inputs, local=lambda x, h0: run(x, h0[0], True),
        summary=summary, decay_shapes=(torch.Size((u.shape[0], u.shape[1], A.shape[-1])),),
        h0_keys=("h0",))
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


def _la_use_engine(backend, q, v):
    from .. import _backend
    from ..chunk.select import select
    return select("linear_attn", _backend.normalize(backend), q, v) == "triton"


def _la_summary(backend):
    """Decay product and end state from zero: the engine's state pass without its output stage
    (Triton), or ``S = sum_t (k_t * exp(sum_{s>t} g_s))^T v_t`` as one matmul (reference)."""
    def summary(x):
        k, v = x["k"], x["v"]
        sd = _la_state_dtype(k)
        G = _la_gate(x, sd)
        A = None if G is None else torch.exp(G.sum(1))
        A = None if A is None else (A[..., None] if G.dim() == 4 else A[:, :, None, None])
        if _la_use_engine(backend, x["q"], v):
            from .engine import la_final_state
            return (A,), (la_final_state(x["q"].contiguous(), k.contiguous(), v.contiguous(),
                                         None if G is None else G.contiguous()),)
        kf = k.to(sd)
        if G is not None:
            # sum_{s>t} g_s, an exclusive reverse cumsum taken directly (no difference of long sums)
            rev = G.flip(1).cumsum(1).flip(1)
            w = torch.exp(torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1))
            kf = kf * (w if G.dim() == 4 else w[..., None])
        return (A,), (torch.einsum("bthk,bthv->bhkv", kf, v.to(sd)),)
    return summary


def _la_adjoint(scale, backend):
    """dL/dS_in through the outputs alone, ``sum_t scale (q_t * exp(sum_{s<=t} g_s))^T do_t``: the
    engine's reverse state-gradient pass without its dh stores (Triton), or one matmul
    (reference); instead of a second backward of the chunked op."""
    def adjoint(x, do):
        q = x["q"]
        sd = _la_state_dtype(q)
        s = q.shape[-1] ** -0.5 if scale is None else float(scale)
        G = _la_gate(x, sd)
        if _la_use_engine(backend, q, do):
            from .engine import la_state_adjoint
            return (la_state_adjoint(q.contiguous(), do.contiguous(),
                                     None if G is None else G.contiguous(), s),)
        qf = q.to(sd) * s
        if G is not None:
            w = torch.exp(G.cumsum(1))
            qf = qf * (w if G.dim() == 4 else w[..., None])
        return (torch.einsum("bthk,bthv->bhkv", qf, do.to(sd)),)
    return adjoint


def cp_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, *, backend=None,
                        process_group=None):
    """`chunk_simple_gla` over a sequence split along T. Later ranks: the engine's state pass as
    summary, its reverse state-gradient pass as adjoint."""
    from ..linear_attn.interface import _validate, _validate_gamma, chunk_simple_gla
    _check_group("chunk_simple_gla", process_group, cu_seqlens)
    if _solo(process_group):
        return chunk_simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                backend=backend)
    _validate("chunk_simple_gla", q, k, v, g, "head", scale, initial_state, None)
    _validate_gamma("chunk_simple_gla", g_gamma, q)

    def local(x, h0):
        o, ht = chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], scale, h0[0], True,
                                 backend=backend)
        return o, (ht,)

    B, _, H = q.shape[:3]
    decay = None if g is None and g_gamma is None else torch.Size((B, H, 1, 1))
    inputs = {"q": q, "k": k, "v": v, "g": g, "g_gamma": g_gamma, "h0": initial_state}
    o, (ht,) = context_parallel("chunk_simple_gla", process_group, inputs, local=local,
                                summary=_la_summary(backend), decay_shapes=(decay,),
                                h0_keys=("h0",), adjoint=_la_adjoint(scale, backend))
    return o, (ht if output_final_state else None)


def cp_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_gla` over a sequence split along T. Later ranks: the engine's state pass as summary,
    its reverse state-gradient pass as adjoint."""
    from ..linear_attn.interface import _validate, chunk_gla
    _check_group("chunk_gla", process_group, cu_seqlens)
    if _solo(process_group):
        return chunk_gla(q, k, v, g, scale, initial_state, output_final_state, backend=backend)
    if g is None:
        raise ValueError("chunk_gla: g ([B, T, H, K] log-decays) is required")
    _validate("chunk_gla", q, k, v, g, "key", scale, initial_state, None)

    def local(x, h0):
        o, ht = chunk_gla(x["q"], x["k"], x["v"], x["g"], scale, h0[0], True, backend=backend)
        return o, (ht,)

    B, _, H, K = q.shape
    o, (ht,) = context_parallel("chunk_gla", process_group,
                                {"q": q, "k": k, "v": v, "g": g, "h0": initial_state},
                                local=local, summary=_la_summary(backend),
                                decay_shapes=(torch.Size((B, H, K, 1)),), h0_keys=("h0",),
                                adjoint=_la_adjoint(scale, backend))
    return o, (ht if output_final_state else None)


def cp_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                         normalize=True, cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_linear_attn` over a sequence split along T. No decay (A = 1); with normalize the
    running key sum is a second state in the same exchange and the local step is the public
    normalize=True call; its adjoint is written out (the output is not linear in the key sum, so
    it reads the output and the incoming key sum) instead of a second backward of the op."""
    from ..linear_attn.interface import _validate, chunk_linear_attn
    from ..validation import check_tensor
    _check_group("chunk_linear_attn", process_group, cu_seqlens)
    if _solo(process_group):
        return chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize,
                                 backend=backend)
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
                                    summary=_la_summary(backend), decay_shapes=(None,),
                                    h0_keys=("h0",), adjoint=_la_adjoint(scale, backend))
        return o, (ht if output_final_state else None)

    if z0 is not None:
        check_tensor("chunk_linear_attn", "initial_state[1] (z_state)", z0)
        if tuple(z0.shape) != (q.shape[0], 1, q.shape[2], q.shape[3]):
            raise ValueError(f"chunk_linear_attn: initial_state[1] (z_state) must have shape "
                             f"[N, 1, H, K] = {(q.shape[0], 1, q.shape[2], q.shape[3])}, got "
                             f"{tuple(z0.shape)}")
    sd = _la_state_dtype(q)

    def local(x, h0):   # the public normalize=True call (one `_Normalize` node), from (S, z)
        o, (ht, zt) = chunk_linear_attn(x["q"], x["k"], x["v"], scale, (h0[0], h0[1]), True,
                                        normalize=True, backend=backend)
        return o, (ht, zt)

    la = _la_summary(backend)
    la_adj = _la_adjoint(scale, backend)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def summary(x):
        return (None, None), la(x)[1] + (x["k"].sum(1, keepdim=True, dtype=sd),)

    def adjoint(x, do):
        """out_t = o_t / den_t, o_t = s q_t S_t, den_t = s q_t . z_t + 1e-10 (S_t, z_t from the
        incoming (S, z)): dL/dS_in = sum_t (s q_t)^T (do_t / den_t), the unnormalized adjoint on
        do / den (rounded to v's dtype, as the op's own backward rounds it); dL/dz_in =
        sum_t c_t q_t with c_t = -s (do_t . out_t) / den_t. From q, k, do and out: no second
        backward of the chunked op."""
        qf = x["q"].to(sd)
        kc = torch.cumsum(x["k"], 1, dtype=sd)
        z_in = x["_h_in"][1]
        if z_in is not None:
            kc = kc + z_in.to(sd)
        den = (qf * kc).sum(-1, keepdim=True).mul_(s).add_(1e-10)
        gd = do.to(sd) / den
        c = (do.to(sd) * x["_out"].to(sd)).sum(-1, keepdim=True).div_(den).mul_(-s)
        return la_adj(x, gd.to(do.dtype))[0], (c * qf).sum(1, keepdim=True)

    o, (ht, z) = context_parallel("chunk_linear_attn", process_group, {**inputs, "z0": z0},
                                  local=local, summary=summary, decay_shapes=(None, None),
                                  h0_keys=("h0", "z0"), adjoint=adjoint, adjoint_reads_out=True)
    return o, ((ht, z) if output_final_state else None)


def cp_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                 initial_states=None, seq_idx=None, cu_seqlens=None,
                                 dt_softplus=False, dt_limit=(0.0, float("inf")),
                                 return_final_states=False, return_varlen_states=False, *,
                                 backend=None, process_group=None):
    """`mamba_chunk_scan_combined` (SSD) over a sequence split along seqlen. Decay per head:
    ``exp(A_h sum_t dt_t)`` on the processed dt. Later ranks: the chunk engine's state pass (SSD
    mapping: q = C, k = B, v = x dt, g = dt A) as summary, its reverse state-gradient pass on
    ``dy * silu(z)`` as adjoint (D x does not depend on the state)."""
    from .. import _backend
    from ..chunk.select import select
    from ..ssd.interface import mamba_chunk_scan_combined
    from ..ssd.reference import heads, process_dt
    op = "mamba_chunk_scan_combined"
    _check_group(op, process_group, cu_seqlens)
    if seq_idx is not None or return_varlen_states:
        raise ValueError(f"{op}: seq_idx / return_varlen_states (packed sequences) cannot be "
                         f"combined with process_group (context parallelism)")
    if _solo(process_group):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                         initial_states=initial_states, dt_softplus=dt_softplus,
                                         dt_limit=dt_limit,
                                         return_final_states=return_final_states, backend=backend)
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32

    def local(xs, h0):
        y, fin = mamba_chunk_scan_combined(
            xs["x"], xs["dt"], xs["A"], xs["B"], xs["C"], chunk_size, D=xs["D"], z=xs["z"],
            dt_bias=xs["dt_bias"], initial_states=h0[0], dt_softplus=dt_softplus,
            dt_limit=dt_limit, return_final_states=True, backend=backend)
        return y, (fin,)

    def prep(xs):
        dtp = process_dt(xs["dt"], xs["dt_bias"], dt_softplus, dt_limit).to(sd)   # (b, l, h)
        return dtp, xs["A"].to(sd)

    def engine(xs):
        return select("ssd", _backend.normalize(backend), xs["x"], xs["B"]) == "triton"

    def summary(xs):
        dtp, As = prep(xs)
        decay = torch.exp(dtp.sum(1) * As)[:, :, None, None]                      # (b, h, 1, 1)
        if engine(xs):
            from .engine import la_final_state
            ht = la_final_state(xs["C"].contiguous(), xs["B"].contiguous(), xs["x"].contiguous(),
                                None, vs=dtp.contiguous(), A=As.contiguous())
            return (decay,), (ht.transpose(-1, -2),)                              # (b, h, p, n)
        # S = sum_t exp(sum_{s>t} dt_s A) dt_t x_t B_t^T (exclusive reverse cumsum, as _la_summary)
        a = dtp * As
        rev = a.flip(1).cumsum(1).flip(1)
        w = torch.exp(torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1)) * dtp
        Bh = heads(xs["B"].to(sd), x.shape[2])
        return (decay,), (torch.einsum("blhp,blhn->bhpn", xs["x"].to(sd) * w[..., None], Bh),)

    def adjoint(xs, dy):
        dtp, As = prep(xs)
        if xs["z"] is not None:   # y = (y_ssd + D x) * silu(z): the state reaches y_ssd only
            dy = (dy.to(sd) * F.silu(xs["z"].to(sd))).to(x.dtype)
        if engine(xs):
            from .engine import la_state_adjoint
            mu = la_state_adjoint(xs["C"].contiguous(), dy.contiguous(), None, 1.0,
                                  vs=dtp.contiguous(), A=As.contiguous())
            return (mu.transpose(-1, -2),)
        w = torch.exp((dtp * As).cumsum(1))                                       # (b, l, h)
        Ch = heads(xs["C"].to(sd), x.shape[2]) * w[..., None]
        return (torch.einsum("blhn,blhp->bhpn", Ch, dy.to(sd)),)

    inputs = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
              "h0": initial_states}
    y, (fin,) = context_parallel(op, process_group, inputs, local=local, summary=summary,
                                 decay_shapes=(torch.Size((x.shape[0], x.shape[2], 1, 1)),),
                                 h0_keys=("h0",), adjoint=adjoint)
    return (y, fin) if return_final_states else y


def _cp_delta_rule(fn, q, k, v, g, beta, scale, initial_state, output_final_state, use_l2norm,
                   cu_seqlens, backend, process_group):
    """`chunk_delta_rule` / `chunk_gated_delta_rule` (g given) over a sequence split along T.

    The state map of a segment is affine with a MATRIX decay: ``S_end = M S_in + S_end(0)``,
    ``M = prod_t exp(g_t) (I - beta_t k_t k_t^T)`` [K, K] per (batch, value head). Summary (later
    ranks): ONE call of the op on ``[v | 0]`` (width V + K) from ``[0 | I]``: its final state is
    ``[S_end(0) | M]`` and the extra output columns are ``w_t = scale Phi_t^T q_t``
    (Phi_t = the transition up to t), so the outputs are ``o_t = o_t(0) + S_in^T w_t``; kept for
    the adjoint ``dL/dS_in = sum_t w_t do_t^T`` (one [K, T] x [T, V] product per head instead of a
    second backward of the op). The output correction needs the op from the true state anyway
    (its saved graph for the backward), so the local pass runs once from ``S_in``."""
    from ..delta_rule import interface as dr
    from ..delta_rule.reference import state_dtype
    gated = g is not None
    public = dr.chunk_gated_delta_rule if gated else dr.chunk_delta_rule
    _check_group(fn, process_group, cu_seqlens)

    def call(x, v_, h0, final=True):
        head = (x["q"], x["k"], v_) + ((x["g"],) if gated else ()) + (x["beta"],)
        return public(*head, scale, h0, final, use_l2norm, backend=backend)

    inputs = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "h0": initial_state}
    if _solo(process_group):
        return call(inputs, v, initial_state, output_final_state)
    dr._validate(fn, q, k, v, g, beta, scale, initial_state, None, gated)
    B, K = q.shape[0], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    sd = state_dtype(q.dtype)
    kept = {}
    need_w = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs.values())

    def local(x, h0):
        o, ht = call(x, x["v"], h0[0])
        return o, (ht,)

    def summary(x):
        xv = x["v"]
        v_ext = torch.cat([xv, xv.new_zeros(xv.shape[:3] + (K,))], -1)
        h0 = q.new_zeros((B, HV, K, V + K), dtype=sd)
        h0[..., V:] = torch.eye(K, dtype=sd, device=q.device)
        o, ht = call(x, v_ext, h0)
        if need_w:   # the adjoint's operand, [B, T, HV, K] in v's dtype
            kept["w"] = o[..., V:].contiguous()
        return (ht[..., V:],), (ht[..., :V],)

    def adjoint(x, do):
        return (torch.einsum("bthk,bthv->bhkv", kept["w"].to(sd), do.to(sd)),)

    o, (ht,) = context_parallel(fn, process_group, inputs, local=local, summary=summary,
                                decay_shapes=(torch.Size((B, HV, K, K)),), h0_keys=("h0",),
                                adjoint=adjoint, matrix_decay=True)
    return o, (ht if output_final_state else None)


def cp_chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend=None,
                        process_group=None):
    """`chunk_delta_rule` over a sequence split along T (see `_cp_delta_rule`)."""
    return _cp_delta_rule("chunk_delta_rule", q, k, v, None, beta, scale, initial_state,
                          output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, backend,
                          process_group)


def cp_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                              output_final_state=False, use_qk_l2norm_in_kernel=False,
                              cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_gated_delta_rule` over a sequence split along T (see `_cp_delta_rule`)."""
    if g is None:
        raise ValueError("chunk_gated_delta_rule: g ([B, T, HV] log-decays) is required")
    return _cp_delta_rule("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
                          output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, backend,
                          process_group)
