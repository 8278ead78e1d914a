"""The specification of the selective scan (Mamba-1): plain PyTorch, any device, float64 too.

For every batch b, channel d and state index n (time t):

    dt[t]  = softplus(delta[t] + delta_bias)            (softplus only if delta_softplus)
    h[t]   = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[n, t] * u[t]
    y[t]   = sum_n C[n, t] * h[t]        (complex A: 2 * Re(sum_n C h), mamba-ssm's convention)
    out[t] = (y[t] + D[d] * u[t]) * silu(z[t])          (D and z optional)

The state is float32 (complex64 for complex A) whatever the storage dtype, float64 when the inputs
are float64. Complex A takes time-invariant B/C as complex (dim, dstate) tensors and time-varying
B/C as real tensors whose last axis holds 2*seqlen interleaved (re, im) pairs, as in mamba-ssm.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .._config import triton_interpret


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64/complex128, else float32."""
    for t in tensors:
        if t is not None and t.dtype in (torch.float64, torch.complex128):
            return torch.float64
    return torch.float32


def state_dtype(u: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """float32 (complex64 for complex A), float64 (complex128) for float64 inputs."""
    cd = compute_dtype(u, A)
    if A.is_complex():
        return torch.complex128 if cd == torch.float64 else torch.complex64
    return cd


def chunk_len(dstate: int) -> int:
    """Steps between the saved forward states the backward restarts from (every backend and the
    fake kernel agree on it, so the saved tensor has one shape)."""
    if triton_interpret():
        return 8
    return 64 if dstate <= 16 else (32 if dstate <= 64 else (16 if dstate <= 128 else 8))


def _as_complex_time(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 2L) real interleaved -> (..., L) complex."""
    x = x.to(dtype)
    return torch.view_as_complex(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())


def _scan_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk=None):
    """One packed batch (batch, dim, L). Returns out, last_state, and the states entering every
    `chunk`-step chunk (list) when chunk is given."""
    cd = compute_dtype(u, delta, A)
    sd = state_dtype(u if cd == torch.float32 else u.to(cd), A)
    dtype_in = u.dtype
    u = u.to(cd)
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.to(sd)
    batch, dim, L = u.shape
    G_B = B.shape[1] if B.dim() == 4 else 1
    G_C = C.shape[1] if C.dim() == 4 else 1

    def at_time(M, G, t):
        """B or C at step t, shaped to broadcast against (batch, dim, dstate)."""
        if M.dim() == 2:
            return M  # (dim, dstate)
        m = M[..., t]  # (batch, G, dstate)
        return m.repeat_interleave(dim // G, dim=1)

    if A.is_complex():
        B = B.to(sd) if B.dim() == 2 else _as_complex_time(B, cd)
        C = C.to(sd) if C.dim() == 2 else _as_complex_time(C, cd)
    else:
        B, C = B.to(cd), C.to(cd)
    h = (torch.zeros(batch, dim, A.shape[1], dtype=sd, device=u.device) if h0 is None
         else h0.to(sd))
    ys, ckpts = [], []
    for t in range(L):
        if chunk is not None and t % chunk == 0:
            ckpts.append(h)
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + (dt_t * u[:, :, t, None]) * at_time(B, G_B, t)
        y = (h * at_time(C, G_C, t)).sum(-1)
        ys.append(2 * y.real if y.is_complex() else y)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(dtype_in), h, ckpts


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, cu_seqlens=None):
    """Reference for `ssm_kernels.selective_scan_fn`: same signature, no validation, differentiable
    by autograd through an O(seqlen) Python loop. Computes in float32 (float64 if u, delta or A is
    float64) and returns `out` in u's dtype, `last_state` in the state dtype.

    Shapes: u, delta, z (batch, dim, L); A (dim, dstate); B, C (dim, dstate) or (batch, dstate, L')
    or (batch, groups, dstate, L') with L' = L (real A) or 2L (complex A, interleaved pairs);
    D, delta_bias (dim,); initial_state (batch, dim, dstate) or (nseq, dim, dstate) with
    cu_seqlens (nseq + 1,) packing sequences along L of a batch of one.
    """
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    if cu_seqlens is None:
        out, last, _ = _scan_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
        return (out, last) if return_last_state else out
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, lasts = [], []
    w = 2 if A.is_complex() else 1
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        sl = slice(lo, hi)
        var = lambda M: M if M.dim() == 2 else M[..., lo * w:hi * w]  # noqa: E731
        o, h, _ = _scan_one(u[..., sl], delta[..., sl], A, var(B), var(C), D,
                            None if z is None else z[..., sl], delta_bias, delta_softplus,
                            None if initial_state is None else initial_state[s:s + 1])
        outs.append(o)
        lasts.append(h)
    out = torch.cat(outs, dim=-1)
    return (out, torch.cat(lasts, 0)) if return_last_state else out


def selective_scan_fwd_ref(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus,
                           save_ckpt):
    """Forward on the canonical layout (B, C 2-d or 4-d): (out, last_state, checkpoints).

    checkpoints: the states entering each chunk of `chunk_len(dstate)` steps, (rows, dim, dstate)
    in the state dtype; chunk k of batch b is row b * cdiv(L, chunk) + k, chunk k of packed
    sequence s is row ckpt_offsets(cu_seqlens)[s] + k; (0, dim, dstate) when save_ckpt is False.
    """
    chunk = chunk_len(A.shape[1]) if save_ckpt else None
    with torch.no_grad():
        if cu_seqlens is None:
            out, last, ck = _scan_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk)
            rows = [c for c in torch.stack(ck, 1).flatten(0, 1)] if ck else []
        else:
            bounds = [int(x) for x in cu_seqlens.tolist()]
            w = 2 if A.is_complex() else 1
            outs, lasts, rows = [], [], []
            for s in range(len(bounds) - 1):
                lo, hi = bounds[s], bounds[s + 1]
                var = lambda M: M if M.dim() == 2 else M[..., lo * w:hi * w]  # noqa: E731
                o, h, ck = _scan_one(u[..., lo:hi], delta[..., lo:hi], A, var(B), var(C), D,
                                     None if z is None else z[..., lo:hi], delta_bias,
                                     delta_softplus, None if h0 is None else h0[s:s + 1], chunk)
                outs.append(o)
                lasts.append(h)
                rows.extend(c[0] for c in ck)
            out, last = torch.cat(outs, -1), torch.cat(lasts, 0)
        n_rows = ckpt_rows(u.shape[0], u.shape[-1], A.shape[1], cu_seqlens) if save_ckpt else 0
        ckpt = last.new_zeros((n_rows,) + tuple(last.shape[1:]))
        if rows:
            ckpt[:len(rows)] = torch.stack(rows, 0)
        return out.contiguous(), last.contiguous(), ckpt


def ckpt_rows(batch: int, L: int, dstate: int, cu_seqlens: Optional[torch.Tensor]) -> int:
    """Rows of the checkpoint tensor (static in shapes, for the fake kernel)."""
    chunk = chunk_len(dstate)
    if cu_seqlens is None:
        return batch * (-(-L // chunk))
    return -(-L // chunk) + cu_seqlens.shape[0] - 1


def ckpt_offsets(cu_seqlens: torch.Tensor, dstate: int) -> torch.Tensor:
    """First checkpoint row of every packed sequence (int32, on cu_seqlens' device, no sync)."""
    chunk = chunk_len(dstate)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = (lens + chunk - 1) // chunk
    return torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]]).to(torch.int32)


def _bwd_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, dout, dlast):
    """Analytic backward of one packed batch, the algebra the kernels use (real or complex):

        g[t] = dL/dh[t] = dy[t] conj(C[t]) (x2 for complex A) + conj(a[t+1]) g[t+1],
        g[L-1] also receives d last_state;  with P = a[t] h[t-1] = h[t] - X[t], X = dt u B:
        dA += dt g conj(P),  d dt += Re(g conj(P A)) + u Re(g conj(B)),  du += dt Re(g conj(B)),
        dB += dt u g,  dC += dy conj(h) (x2 for complex),  d h0 = conj(a[0]) g[0].
    """
    cd = compute_dtype(u, delta, A)
    sd = state_dtype(u if cd == torch.float32 else u.to(cd), A)
    cplx = A.is_complex()
    batch, dim, L = u.shape
    N = A.shape[1]
    uu = u.to(cd)
    raw = delta.to(cd) + (0 if delta_bias is None else delta_bias.to(cd)[:, None])
    dt = F.softplus(raw) if delta_softplus else raw
    A_ = A.to(sd)

    def full(M):
        """B or C as (batch, dim, N, L) in the state dtype."""
        if M.dim() == 2:
            return M.to(sd)[None, :, :, None].expand(batch, dim, N, L)
        m = _as_complex_time(M, cd) if cplx else M.to(cd)
        return m.repeat_interleave(dim // M.shape[1], dim=1)

    Bf, Cf = full(B), full(C)
    a = torch.exp(dt[:, :, None, :] * A_[None, :, :, None])  # (batch, dim, N, L)
    X = (dt * uu)[:, :, None, :] * Bf
    hs = []
    h = torch.zeros(batch, dim, N, dtype=sd, device=u.device) if h0 is None else h0.to(sd)
    for t in range(L):
        h = a[..., t] * h + X[..., t]
        hs.append(h)
    H = torch.stack(hs, -1)
    y = (Cf * H).sum(2)
    y = 2 * y.real if cplx else y
    if D is not None:
        y = y + uu * D.to(cd)[:, None]
    do = dout.to(cd)
    dz = None
    if z is not None:
        zz = z.to(cd)
        sig = torch.sigmoid(zz)
        dz = (do * y * sig * (1 + zz * (1 - sig))).to(z.dtype)
        dy = do * zz * sig
    else:
        dy = do
    k = 2.0 if cplx else 1.0
    Gd = k * dy[:, :, None, :] * Cf.conj()
    G = torch.empty_like(H)
    g = dlast.to(sd)
    coef = torch.ones_like(g)
    for t in range(L - 1, -1, -1):
        g = Gd[..., t] + coef * g
        G[..., t] = g
        coef = a[..., t].conj()
    dh0 = coef * g
    GP = G * (H - X).conj()
    re = (lambda x: x.real) if cplx else (lambda x: x)  # noqa: E731
    gb = re(G * Bf.conj()).sum(2)
    du = dt * gb
    ddt = re(GP * A_.conj()[None, :, :, None]).sum(2) + uu * gb
    dA = (dt[:, :, None, :] * GP).sum((0, 3))
    dBf = (dt * uu)[:, :, None, :] * G
    dCf = k * dy[:, :, None, :] * H.conj()

    def reduce(dM, M):
        if M.dim() == 2:
            return dM.sum((0, 3)).to(M.dtype)
        r = dM.reshape(batch, M.shape[1], dim // M.shape[1], N, L).sum(2)
        if cplx:
            r = torch.view_as_real(r).reshape(*r.shape[:-1], 2 * L)
        return r.to(M.dtype)

    dD = None
    if D is not None:
        du = du + dy * D.to(cd)[:, None]
        dD = (dy * uu).sum((0, 2)).to(D.dtype)
    if delta_softplus:
        ddt = torch.where(raw <= 20, ddt * torch.sigmoid(raw), ddt)
    dbias = None if delta_bias is None else ddt.sum((0, 2)).to(delta_bias.dtype)
    return [du.to(u.dtype), ddt.to(delta.dtype), dA.to(A.dtype), reduce(dBf, B), reduce(dCf, C),
            dD, dz, dbias, dh0]


def selective_scan_bwd_ref(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus,
                           dout, dlast) -> List[Optional[torch.Tensor]]:
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, h0) on the canonical layout, None where
    the input is None (plain torch, no autograd: it runs inside a registered op)."""
    with torch.no_grad():
        if cu_seqlens is None:
            res = _bwd_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, dout, dlast)
        else:
            bounds = [int(x) for x in cu_seqlens.tolist()]
            w = 2 if A.is_complex() else 1
            parts = []
            for s in range(len(bounds) - 1):
                lo, hi = bounds[s], bounds[s + 1]
                var = lambda M: M if M.dim() == 2 else M[..., lo * w:hi * w]  # noqa: E731
                parts.append(_bwd_one(u[..., lo:hi], delta[..., lo:hi], A, var(B), var(C), D,
                                      None if z is None else z[..., lo:hi], delta_bias,
                                      delta_softplus, None if h0 is None else h0[s:s + 1],
                                      dout[..., lo:hi], dlast[s:s + 1]))
            cat_t = lambda i: torch.cat([p[i] for p in parts], -1)  # noqa: E731
            add = lambda i: sum(p[i] for p in parts)  # noqa: E731
            res = [cat_t(0), cat_t(1), add(2),
                   add(3) if B.dim() == 2 else cat_t(3), add(4) if C.dim() == 2 else cat_t(4),
                   None if D is None else add(5), None if z is None else cat_t(6),
                   None if delta_bias is None else add(7), torch.cat([p[8] for p in parts], 0)]
        if h0 is None:
            res[8] = None
        else:
            res[8] = res[8].to(h0.dtype)
        return res


# ---- the decode step ---------------------------------------------------------------------------

def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None):
    """Reference for `ssm_kernels.selective_state_update` (updates `state` in place, returns out).

    state (batch, dim, dstate) or (batch, nheads, dim, dstate); x, dt, z (batch, [nheads,] dim);
    A ([nheads,] dim, dstate); B, C (batch, [ngroups,] dstate); D, dt_bias ([nheads,] dim).
    Computes in float32 (float64 for float64 inputs).
    """
    has_heads = state.dim() == 4
    st = state if has_heads else state.unsqueeze(1)
    x3 = x if has_heads else x.unsqueeze(1)
    dt3 = dt if has_heads else dt.unsqueeze(1)
    A3 = A if has_heads else A.unsqueeze(0)
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    cd = compute_dtype(x, dt, A, state)
    nheads = st.shape[1]
    rep = nheads // B3.shape[1]
    if state_batch_indices is not None:
        idx = state_batch_indices.long()
        valid = idx >= 0
        s_rows = st[idx.clamp(min=0)].to(cd)
    else:
        valid = None
        s_rows = st.to(cd)
    d = dt3.to(cd)
    if dt_bias is not None:
        d = d + (dt_bias if has_heads else dt_bias.unsqueeze(0)).to(cd)
    if dt_softplus:
        d = F.softplus(d)
    dA = torch.exp(d[..., None] * A3.to(cd))
    Bh = B3.to(cd).repeat_interleave(rep, dim=1)[:, :, None, :]
    Ch = C3.to(cd).repeat_interleave(rep, dim=1)[:, :, None, :]
    new = s_rows * dA + (d * x3.to(cd))[..., None] * Bh
    out = (new * Ch).sum(-1)
    if D is not None:
        out = out + x3.to(cd) * (D if has_heads else D.unsqueeze(0)).to(cd)
    if z is not None:
        out = out * F.silu((z if has_heads else z.unsqueeze(1)).to(cd))
    if valid is None:
        st.copy_(new.to(st.dtype))
    else:
        rows = idx[valid]
        st[rows] = new[valid].to(st.dtype)
        out = torch.where(valid[:, None, None], out, torch.zeros_like(out))
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)
