"""States-only passes of the kernels, for the ranks after the first (Python-level launchers over the
existing kernels; no kernel of their own):

- `la_final_state`: the chunk engine's state pass (`chunk_states`, store_h=False): a segment's end
  state from zero, reading k, v (and g) once and writing only [N, H, K, V]: no chunk states, no
  outputs.
- `la_state_adjoint`: the engine's reverse state-gradient pass (`_state_grad_kernel`, STORE_DH=False,
  no incoming final-state gradient): ``dL/dS_in`` through the outputs alone, reading q, do (and g)
  once and writing only [N, H, K, V].
- linear_scan's summaries live beside its kernels (`linear_scan.triton.linear_scan_summary`,
  `linear_scan_adjoint`).
"""
from __future__ import annotations

import importlib.util

import torch
import triton

from ..chunk.bwd import _state_grad_kernel
from ..chunk.fwd import Plan, _dummy, chunk_states


def _engine_gate(p: Plan, g):
    """What the kernels read as `g`: per-key decays (GATE 2) go through the engine's own prologue
    where it has one (chunk-local cumsums, `chunk.gla.chunk_cumsum`, in the per-key rewrite);
    otherwise g as given."""
    if p.gate != 2 or importlib.util.find_spec("ssm_kernels.chunk.gla") is None:
        return g    # the engine before the per-key rewrite reads g itself
    from ..chunk import gla
    return gla.chunk_cumsum(p, g)


def la_final_state(q, k, v, g, vs=None, A=None):
    """q, k [B, T, HQ, K]; v [B, T, H, V] contiguous; g None, [B, T, H] or [B, T, H, K] float32
    log-decays (contiguous); SSD: vs [B, T, H] float32 (v is used as v * vs) and A [H] float32
    (log-decay vs * A). Returns the end state from zero, [B, H, K, V] float32."""
    p = Plan(q, v, g, None, A is not None)
    _, ht = chunk_states(p, k, v, _engine_gate(p, g), vs, A, None, store_h=False)
    return ht


def la_state_adjoint(q, do, g, scale: float, vs=None, A=None):
    """q [B, T, HQ, K]; do [B, T, H, V] (v's dtype) contiguous; g, vs, A as in `la_final_state`.
    Returns ``sum_t scale (q_t exp(G_t))^T do_t`` = dL/dS_in through the outputs, [B, H, K, V]
    float32, by the backward's own reverse chunk scan (deterministic, no atomics)."""
    p = Plan(q, do, g, None, A is not None)
    m = p.meta
    g = _engine_gate(p, g)
    dh0 = q.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32)
    d = _dummy(dh0)
    cu, co, _ = p.idx_args(dh0)
    _state_grad_kernel[(triton.cdiv(p.K, m["BK"]), triton.cdiv(p.V, m["BV"]), p.N * p.H)](
        q, do, d if g is None else g, d if vs is None else vs, d if A is None else A, d, d, dh0,
        cu, co, p.T, p.H, p.HQ, p.K, p.V, float(scale),
        GATE=p.gate, G_FROM_VS=A is not None, HAS_DHT=False, IS_VARLEN=False, BT=p.BT,
        BK=m["BK"], BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"], STORE_DH=False, num_warps=4)
    return dh0
