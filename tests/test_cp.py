"""Context parallelism (process_group=): one sequence split over 2, 3 and 4 gloo processes must give
the single-process call's outputs, final states and every gradient (initial state included).

Process start is the slow part, so each world size starts one group and runs every check in it
(`_CASES`); the CP logic is backend-independent, so workers use the float64 reference backend (exact
comparisons), plus one float32 Triton case under the interpreter at a tiny size.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch.nn.functional as F
import torch

import ssm_kernels as sk

SPLITS = {2: [1, 9], 3: [4, 1, 6], 4: [3, 5, 1, 4]}   # unequal segments, one of length 1


# ---- harness -----------------------------------------------------------------------------------

def _segments(T, world):
    sizes = SPLITS[world]
    assert sum(sizes) == T
    starts = [sum(sizes[:r]) for r in range(world)]
    return starts, sizes


def _loss(outs, weights):
    """A real scalar from (possibly complex, possibly nested) outputs."""
    tot = 0
    for o, w in zip(outs, weights):
        if o is None:
            continue
        p = o.to(w.dtype) * w
        tot = tot + (p.real if p.is_complex() else p).sum()
    return tot


def _compare(name, got, want, rtol, atol, failures):
    if got is None and want is None:
        return
    if (got is None) != (want is None):
        failures.append(f"{name}: one side is None (got {got is None}, want {want is None})")
        return
    got, want = got.detach().to(want.dtype), want.detach()
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().max().item()
        failures.append(f"{name}: max abs err {err:.3g} (scale {want.abs().max().item():.3g})")


def run_case(case, rank, world, group, failures):
    """case: dict with
        make() -> (time_inputs: dict name -> (tensor, time_dim), other: dict name -> tensor)
        call(inputs: dict, process_group) -> (out, finals tuple)
        T, rtol, atol."""
    torch.manual_seed(case.get("seed", 0))
    T = case["T"]
    timed, shared = case["make"]()
    starts, sizes = _segments(T, world)
    st, n = starts[rank], sizes[rank]
    # the single-process call on the whole sequence
    full = {k: x.clone().requires_grad_(x.is_floating_point() or x.is_complex())
            for k, (x, _) in timed.items()}
    full_shared = {k: None if x is None else x.clone().requires_grad_(True)
                   for k, x in shared.items()}
    out, finals = case["call"]({**full, **full_shared}, None)
    g_out = torch.randn_like(out)
    g_fin = [None if f is None else torch.randn_like(f) for f in finals]
    _loss([out] + list(finals), [g_out] + g_fin).backward()
    # this rank's segment; the finals' weight is split over the ranks (their gradients add)
    loc = {}
    for k, (x, d) in timed.items():
        scale = x.shape[d] // T  # complex B/C of the selective scan hold 2 entries per step
        loc[k] = x.narrow(d, st * scale, n * scale).clone().requires_grad_(True)
    loc_shared = {k: None if x is None else x.clone().requires_grad_(True) for k, x in shared.items()}
    cp_out, cp_finals = case["call"]({**loc, **loc_shared}, group)
    d_out = timed[case["out_key"]][1]
    want_out = out.narrow(d_out, st, n)
    g_out_loc = g_out.narrow(d_out, st, n)
    g_fin_loc = [None if g is None else g / world for g in g_fin]
    _loss([cp_out] + list(cp_finals), [g_out_loc] + g_fin_loc).backward()
    tag = f"[{case['name']} rank {rank}/{world}]"
    rt, at = case["rtol"], case["atol"]
    if case.get("lowp"):
        _two_x_rule(case, tag, full, full_shared, out, finals, g_out, g_fin, loc, cp_out, cp_finals,
                    timed, st, n, failures)
    _compare(f"{tag} out", cp_out, want_out, rt, at, failures)
    for i, (f, w) in enumerate(zip(cp_finals, finals)):
        _compare(f"{tag} final[{i}]", f, w, rt, at, failures)
    for k, (x, d) in timed.items():
        scale = x.shape[d] // T
        want = full[k].grad
        if want is not None:
            want = want.narrow(d, st * scale, n * scale)
        _compare(f"{tag} grad {k}", loc[k].grad, want, rt, at, failures)
    with torch.no_grad():   # inference: no private graph, same results
        ni_out, ni_finals = case["call"]({k: None if x is None else x.detach()
                                          for k, x in {**loc, **loc_shared}.items()}, group)
    _compare(f"{tag} no_grad out", ni_out, cp_out.detach(), *case.get("infer_tol", (0, 0)),
             failures)
    for f, w in zip(ni_finals, cp_finals):
        _compare(f"{tag} no_grad final", f, w.detach(), 0, 0, failures)
    for k, x in loc_shared.items():
        if x is None:
            continue
        g = x.grad
        if k in case.get("first_only", ()):   # initial states: the first rank owns them
            first = world - 1 if case.get("reverse") else 0
            if rank == first:
                _compare(f"{tag} grad {k}", g, full_shared[k].grad, rt, at, failures)
            elif g is not None and g.abs().max() > 0:
                failures.append(f"{tag} grad {k}: nonzero on a rank that does not own it")
            continue
        g = torch.zeros_like(x) if g is None else g.clone()   # shared weights: shares add up
        torch.distributed.all_reduce(g, group=group)
        _compare(f"{tag} grad {k} (all-reduced)", g, full_shared[k].grad, rt, at, failures)


def _two_x_rule(case, tag, full, full_shared, out, finals, g_out, g_fin, loc, cp_out, cp_finals,
                timed, st, n, failures):
    """DESIGN.md's rule for low precision: the CP result's error against the float64 reference is
    at most 2x the single-process call's (plus a floor), for the outputs, finals and gradients."""
    x64 = {k: (None if x is None else x.detach().to(torch.float64).requires_grad_())
           for k, x in {**full, **full_shared}.items()}
    o64, f64 = case["call"](x64, None, "reference")
    _loss([o64] + list(f64), [g.to(torch.float64) for g in [g_out] + g_fin]).backward()
    d = timed[case["out_key"]][1]
    err = lambda a, b: ((a.detach().double() - b.detach()).norm() / b.detach().norm()).item()  # noqa
    pairs = [("out", cp_out, out.narrow(d, st, n), o64.narrow(d, st, n))]
    pairs += [(f"final[{i}]", c, s1, r) for i, (c, s1, r) in enumerate(zip(cp_finals, finals, f64))]
    for k, (x, dd) in timed.items():
        pairs.append((f"grad {k}", loc[k].grad, full[k].grad.narrow(dd, st, n),
                      x64[k].grad.narrow(dd, st, n)))
    for name, cp, single, ref in pairs:
        e_cp, e_single = err(cp, ref), err(single, ref)
        if not e_cp <= 2 * e_single + 1e-6:
            failures.append(f"{tag} {name}: CP error {e_cp:.2e} > 2x single-process {e_single:.2e}")


def _cases(world):
    f64 = torch.float64
    R = "reference"
    T = sum(SPLITS[world])
    B, D, N, H, K, V = 2, 4, 3, 2, 3, 4
    exact = dict(rtol=1e-9, atol=1e-10, T=T)

    def ls_case(name, dtype, dim, reverse, h0, backend=R, tol=exact):
        def make():
            shape = [B, T, D] if dim == 1 else [B, D, T]
            if dtype.is_complex:
                a = torch.polar(torch.rand(shape, dtype=f64) * 0.5 + 0.5,
                                torch.randn(shape, dtype=f64)).to(dtype)
            else:
                a = (torch.rand(shape, dtype=f64) * 0.6 + 0.4).to(dtype)
            b = torch.randn(shape, dtype=dtype)
            hs = torch.randn(B, D, dtype=dtype) if h0 else None
            return {"a": (a, dim), "b": (b, dim)}, {"h0": hs}

        def call(x, pg, bk=backend):
            return _pair(sk.linear_scan(x["a"], x["b"], x["h0"], dim=dim, reverse=reverse,
                                        output_final_state=True, backend=bk,
                                        process_group=pg))
        return dict(name=name, make=make, call=call, out_key="b", first_only=("h0",),
                    reverse=reverse, **tol)

    def ss_case(name, complex_A, varying, extras):
        def make():
            u = torch.randn(B, D, T, dtype=f64)
            delta = torch.rand(B, D, T, dtype=f64) * 0.5
            A = -torch.rand(D, N, dtype=f64) - 0.2
            if complex_A:
                A = torch.complex(A, torch.randn(D, N, dtype=f64))
            L = 2 * T if complex_A else T
            timed = {"u": (u, 2), "delta": (delta, 2)}
            shared = {"A": A}
            if varying:
                timed["B"] = (torch.randn(B, 2, N, L, dtype=f64), 3)
                timed["C"] = (torch.randn(B, 2, N, L, dtype=f64), 3)
            else:
                shared["B"] = torch.randn(D, N, dtype=A.dtype)
                shared["C"] = torch.randn(D, N, dtype=A.dtype)
            if extras:
                timed["z"] = (torch.randn(B, D, T, dtype=f64), 2)
                shared["D"] = torch.randn(D, dtype=f64)
                shared["delta_bias"] = torch.randn(D, dtype=f64) * 0.3
                shared["h0"] = torch.randn(B, D, N, dtype=A.dtype)
            return timed, shared

        def call(x, pg):
            return _pair(sk.selective_scan_fn(
                x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"),
                x.get("delta_bias"), delta_softplus=extras, return_last_state=True,
                initial_state=x.get("h0"), backend=R, process_group=pg))
        return dict(name=name, make=make, call=call, out_key="u", first_only=("h0",), **exact)

    def la_case(name, kind, h0, normalize=False, backend=R, dtype=f64, tol=exact):
        def make():
            q, k = (torch.randn(B, T, H, K, dtype=dtype) for _ in range(2))
            if normalize:   # keep the normaliser away from zero
                q, k = q.abs() + 0.1, k.abs() + 0.1
            v = torch.randn(B, T, H, V, dtype=dtype)
            timed = {"q": (q, 1), "k": (k, 1), "v": (v, 1)}
            shared = {}
            if kind == "simple":
                timed["g"] = (-torch.rand(B, T, H, dtype=dtype) * 0.5, 1)
                shared["g_gamma"] = -torch.rand(H, dtype=dtype) * 0.3
            elif kind == "gamma":
                shared["g_gamma"] = -torch.rand(H, dtype=dtype) * 0.3
            elif kind == "gla":
                timed["g"] = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, dtype=dtype)), 1)
            if h0:
                shared["h0"] = torch.randn(B, H, K, V, dtype=dtype)
                if normalize:
                    shared["z0"] = torch.rand(B, 1, H, K, dtype=dtype) + 0.5
            return timed, shared

        def call(x, pg, bk=backend):
            backend = bk
            if kind in ("simple", "gamma"):
                o, ht = sk.chunk_simple_gla(x["q"], x["k"], x["v"], x.get("g"), x.get("g_gamma"),
                                            initial_state=x.get("h0"), output_final_state=True,
                                            backend=backend, process_group=pg)
                return o, (ht,)
            if kind == "gla":
                o, ht = sk.chunk_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x.get("h0"),
                                     output_final_state=True, backend=backend, process_group=pg)
                return o, (ht,)
            h0s = x.get("h0")
            if normalize and h0s is not None:
                h0s = (h0s, x["z0"])
            o, st = sk.chunk_linear_attn(x["q"], x["k"], x["v"], initial_state=h0s,
                                         output_final_state=True, normalize=normalize,
                                         backend=backend, process_group=pg)
            return o, (tuple(st) if normalize else (st,))
        return dict(name=name, make=make, call=call, out_key="v", first_only=("h0", "z0"), **tol)

    def ssd_case(name, extras, backend=R, dtype=f64, tol=exact):
        P, Hh, G, Ns = 3, 4, 2, 3

        def make():
            x = torch.randn(B, T, Hh, P, dtype=dtype)
            dt = torch.rand(B, T, Hh, dtype=f64) * 0.5
            timed = {"x": (x, 1), "dt": (dt, 1), "B": (torch.randn(B, T, G, Ns, dtype=dtype), 1),
                     "C": (torch.randn(B, T, G, Ns, dtype=dtype), 1)}
            shared = {"A": -torch.rand(Hh, dtype=f64) - 0.2}
            if extras:
                timed["z"] = (torch.randn(B, T, Hh, P, dtype=dtype), 1)
                shared["D"] = torch.randn(Hh, dtype=f64)
                shared["dt_bias"] = torch.randn(Hh, dtype=f64) * 0.3
                shared["h0"] = torch.randn(B, Hh, P, Ns, dtype=f64)
            return timed, shared

        def call(x, pg, bk=backend):
            return _pair(sk.mamba_chunk_scan_combined(
                x["x"], x["dt"], x["A"], x["B"], x["C"], 4, D=x.get("D"), z=x.get("z"),
                dt_bias=x.get("dt_bias"), initial_states=x.get("h0"), dt_softplus=extras,
                return_final_states=True, backend=bk, process_group=pg))
        return dict(name=name, make=make, call=call, out_key="x", first_only=("h0",), **tol)

    def dr_case(name, gated, h0, l2, heads=(1, 2), backend=R, dtype=f64, tol=exact):
        """chunk_(gated_)delta_rule: a [K, K] transition per (batch, value head) in the exchange;
        heads = (H, HV) (HV > H: grouped value heads); unit keys unless the op normalizes them."""
        Hq, HV = heads

        def make():
            q, k = (torch.randn(B, T, Hq, K, dtype=dtype) for _ in range(2))
            if not l2:
                k = F.normalize(k, dim=-1)
            timed = {"q": (q, 1), "k": (k, 1), "v": (torch.randn(B, T, HV, V, dtype=dtype), 1),
                     "beta": (torch.rand(B, T, HV, dtype=dtype) * 1.5 + 0.2, 1)}
            if gated:
                timed["g"] = (F.logsigmoid(torch.randn(B, T, HV, dtype=dtype) + 1), 1)
            shared = {"h0": torch.randn(B, HV, K, V, dtype=dtype)} if h0 else {}
            return timed, shared

        def call(x, pg, bk=backend):
            kw = dict(initial_state=x.get("h0"), output_final_state=True,
                      use_qk_l2norm_in_kernel=l2, backend=bk, process_group=pg)
            if gated:
                return _pair(sk.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                       **kw))
            return _pair(sk.chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw))
        return dict(name=name, make=make, call=call, out_key="v", first_only=("h0",), **tol)

    cases = [
        ls_case("linear_scan", f64, 1, False, True),
        ls_case("linear_scan complex dim=-1", torch.complex128, -1, False, True),
        ls_case("linear_scan reverse", f64, 1, True, True),
        ss_case("selective_scan varying B/C, D, z, bias, softplus, h0", False, True, True),
        ss_case("selective_scan invariant B/C", False, False, False),
        ss_case("selective_scan complex A", True, True, True),
        la_case("chunk_simple_gla g+g_gamma h0", "simple", True),
        la_case("chunk_simple_gla g_gamma only", "gamma", False),
        la_case("chunk_gla h0", "gla", True),
        la_case("chunk_linear_attn", "none", True),
        la_case("chunk_linear_attn normalize (kv, z) state", "none", True, normalize=True),
    ]
    if _has_cp("mamba_chunk_scan_combined"):   # SSD, once its interface takes process_group
        cases += [ssd_case("mamba_chunk_scan_combined D, z, dt_bias, softplus, h0", True),
                  ssd_case("mamba_chunk_scan_combined plain", False)]
    if _has_cp("chunk_gated_delta_rule"):
        cases += [dr_case("chunk_gated_delta_rule GVA l2norm h0", True, True, True),
                  dr_case("chunk_delta_rule unit keys", False, False, False, heads=(2, 2)),
                  dr_case("chunk_delta_rule GVA l2norm h0", False, True, True, heads=(2, 4))]
    # the Triton kernels on these CPU tensors: only under the interpreter (a GPU machine leaves it off)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if world == 2 and interp:  # float16 (bf16 dots are wrong in the interpreter)
        lowp = dict(rtol=1e-2, atol=1e-2, T=T, lowp=True)
        cases += [ls_case("linear_scan triton f16", torch.float16, 1, False, True, "triton", lowp),
                  la_case("chunk_simple_gla triton f16", "simple", True, backend="triton",
                          dtype=torch.float16, tol=lowp),
                  # the summary's w columns are rounded to f16 (the adjoint reads them)
                  dr_case("chunk_gated_delta_rule triton f16 GVA l2norm h0", True, True, True,
                          backend="triton", dtype=torch.float16, tol=lowp)]
    if world == 3 and interp:  # the later ranks' states-only Triton passes of the others, f32
        f32 = dict(rtol=2e-4, atol=2e-4, T=T)
        cases += [ls_case("linear_scan triton complex64 dim=-1 reverse", torch.complex64, -1, True,
                          True, "triton", f32),
                  la_case("chunk_gla triton f32", "gla", True, backend="triton",
                          dtype=torch.float32, tol=f32),
                  la_case("chunk_linear_attn triton f32", "none", False, backend="triton",
                          dtype=torch.float32, tol=f32),
                  # the written-out normalized adjoint through the engine's state-gradient pass
                  la_case("chunk_linear_attn normalize triton f32 (kv, z) state", "none", True,
                          normalize=True, backend="triton", dtype=torch.float32, tol=f32),
                  # inference runs SSD's z gate inside the output kernel (ssd.interface
                  # _fused_epilogue), training in torch: the two silu()s differ in the last ulp
                  dict(ssd_case("mamba_chunk_scan_combined triton f32 D, z, dt_bias, h0", True,
                                backend="triton", dtype=torch.float32, tol=f32),
                       infer_tol=(1e-6, 1e-6)),
                  # the chunked WY kernels from [0 | I] on [v | 0] (width V + K) as the summary
                  dr_case("chunk_gated_delta_rule triton f32 GVA l2norm h0", True, True, True,
                          backend="triton", dtype=torch.float32, tol=f32),
                  dr_case("chunk_delta_rule triton f32 unit keys", False, False, False,
                          heads=(2, 2), backend="triton", dtype=torch.float32, tol=f32)]
    return cases


def _pair(res):
    out, fin = res
    return out, (fin,)


def _has_cp(name):
    import inspect
    fn = getattr(sk, name, None)
    return fn is not None and "process_group" in inspect.signature(fn).parameters


def _error_cases(rank, group, failures):
    """Refusals that need a real group: packed sequences, mismatched shapes across ranks."""
    import ssm_kernels as sk
    q = torch.randn(1, 4, 2, 3)
    try:
        sk.chunk_gla(q, q, q, -torch.rand(1, 4, 2, 3), cu_seqlens=torch.tensor([0, 2, 4]),
                     process_group=group)
        failures.append("cu_seqlens + process_group did not raise")
    except ValueError as e:
        if "cu_seqlens" not in str(e):
            failures.append(f"cu_seqlens refusal message: {e}")
    D = 3 + rank  # state shapes differ across ranks
    try:
        sk.linear_scan(torch.rand(2, 4, D), torch.randn(2, 4, D), backend="reference",
                       process_group=group)
        failures.append("mismatched state shapes across ranks did not raise")
    except ValueError as e:
        if "agree across ranks" not in str(e):
            failures.append(f"shape mismatch message: {e}")


def _worker(rank, world, store_path, result_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    failures = []
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        group = dist.group.WORLD
        for case in _cases(world):
            try:
                run_case(case, rank, world, group, failures)
            except Exception:
                failures.append(f"[{case['name']} rank {rank}] raised:\n{traceback.format_exc()}")
        _error_cases(rank, group, failures)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_matches_single_process(world):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children inherit the imported torch and ssm_kernels (spawn re-imports, ~seconds)
        ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp),
                                 nprocs=world, join=False, start_method="fork")
        import time
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"CP workers (world {world}) hung")
        msgs = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.txt")
            if not os.path.exists(path):
                msgs.append(f"rank {r} wrote no result")
                continue
            text = open(path).read()
            if text:
                msgs.append(text)
    assert not msgs, "\n".join(msgs)


def test_no_group_no_distributed_import():
    """Without process_group the CP module is never imported."""
    sys.modules.pop("ssm_kernels.distributed", None)
    a = torch.rand(2, 5, 3)
    sk.linear_scan(a, a, backend="reference")
    q = torch.randn(1, 5, 2, 3)
    sk.chunk_gla(q, q, q, -torch.rand(1, 5, 2, 3), backend="reference")
    sk.selective_scan_fn(torch.randn(1, 2, 5), torch.rand(1, 2, 5), -torch.rand(2, 3),
                         torch.randn(2, 3), torch.randn(2, 3), backend="reference")
    sk.chunk_gated_delta_rule(q, q, q, -torch.rand(1, 5, 2), torch.rand(1, 5, 2),
                              backend="reference")
    sk.chunk_delta_rule(q, q, q, torch.rand(1, 5, 2), backend="reference")
    assert "ssm_kernels.distributed" not in sys.modules


def test_process_group_type_checked():
    a = torch.rand(2, 5, 3)
    with pytest.raises(TypeError, match="process_group"):
        sk.linear_scan(a, a, process_group="world")
    q, v, beta = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.rand(1, 8, 2)
    with pytest.raises(TypeError, match="chunk_delta_rule: process_group"):
        sk.chunk_delta_rule(q, q, v, beta, process_group="world")
    with pytest.raises(TypeError, match="chunk_gated_delta_rule: process_group"):
        sk.chunk_gated_delta_rule(q, q, v, -torch.rand(1, 8, 2), beta, process_group="world")


# ---- the later ranks' states-only passes, against the reference (no processes) -----------------

@pytest.mark.parametrize("shape,dim,cplx,reverse", [
    ((2, 37, 5), 1, False, False), ((2, 5, 37), -1, False, True), ((2, 37, 5), 1, True, True),
    ((1, 300, 3), 1, False, False),   # few channels, long: time split into chunks, then composed
    ((3, 2, 300), -1, True, True)])
def test_linear_scan_states_only_passes(shape, dim, cplx, reverse):
    """linear_scan_summary = (product of a, end state from zero) and linear_scan_adjoint = dL/dh0
    through the outputs alone, each from one states-only kernel pass, against float64."""
    from conftest import DEVICE
    from ssm_kernels.linear_scan.triton import linear_scan_adjoint, linear_scan_summary
    f64 = torch.complex128 if cplx else torch.float64
    a = torch.rand(shape, dtype=torch.float64) * 0.5 + 0.5
    if cplx:
        a = torch.polar(a, torch.randn(shape, dtype=torch.float64) * 0.3)
    b, dout = torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64)
    d = dim % len(shape)
    P, T, Q = torch.Size(shape[:d]).numel(), shape[d], torch.Size(shape[d + 1:]).numel()
    lp = torch.complex64 if cplx else torch.float32
    canon = lambda t: t.to(lp).to(DEVICE).contiguous().view(P, T, Q)  # noqa: E731
    A, hT = linear_scan_summary(canon(a), canon(b), reverse)
    h0 = torch.zeros(P * Q, dtype=f64).view(shape[:d] + shape[d + 1:]).requires_grad_()
    _, fin = sk.linear_scan(a, b, h0, dim=dim, reverse=reverse, output_final_state=True,
                            backend="reference")
    torch.testing.assert_close(A.cpu().to(f64).view(fin.shape), torch.prod(a, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hT.cpu().to(f64).view(fin.shape), fin.detach(), rtol=1e-5, atol=1e-5)
    h, _ = sk.linear_scan(a, b, h0, dim=dim, reverse=reverse, output_final_state=True,
                          backend="reference")
    want, = torch.autograd.grad(h, h0, dout)
    mu = linear_scan_adjoint(canon(a), canon(dout), reverse)
    torch.testing.assert_close(mu.cpu().to(f64).view(want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", [0, 1, 2])
def test_chunk_engine_states_only_passes(gate):
    """la_final_state (the engine's state pass, no outputs) and la_state_adjoint (its reverse
    state-gradient pass with STORE_DH=False) against the float64 reference op."""
    from conftest import DEVICE
    from ssm_kernels.distributed.engine import la_final_state, la_state_adjoint
    B, T, H, K, V = 2, 45, 2, 16, 12
    q, k = (torch.randn(B, T, H, K, dtype=torch.float64) for _ in range(2))
    v, do = (torch.randn(B, T, H, V, dtype=torch.float64) for _ in range(2))
    g = None if gate == 0 else F.logsigmoid(torch.randn((B, T, H) if gate == 1 else (B, T, H, K),
                                                        dtype=torch.float64) + 2)
    h0 = torch.zeros(B, H, K, V, dtype=torch.float64, requires_grad=True)
    if gate == 2:
        o, ht = sk.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                             backend="reference")
    else:
        o, ht = sk.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                    backend="reference")
    want, = torch.autograd.grad(o, h0, do)
    dev = lambda t: None if t is None else t.float().to(DEVICE).contiguous()  # noqa: E731
    got = la_final_state(dev(q), dev(k), dev(v), dev(g))
    torch.testing.assert_close(got.cpu().double(), ht.detach(), rtol=1e-4, atol=1e-4)
    mu = la_state_adjoint(dev(q), dev(do), dev(g), K ** -0.5)
    torch.testing.assert_close(mu.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_chunk_engine_states_only_passes_ssd_mapping():
    """The same passes with SSD's mapping (v = x dt, log-decay dt A, grouped B/C), against the
    float64 reference op: final state from zero and dL/dh0 through y (no D, no z)."""
    from conftest import DEVICE
    from ssm_kernels.distributed.engine import la_final_state, la_state_adjoint
    b, L, H, P, G, N = 2, 45, 4, 12, 2, 16
    x, dy = (torch.randn(b, L, H, P, dtype=torch.float64) for _ in range(2))
    dt = torch.rand(b, L, H, dtype=torch.float64) * 0.5
    A = -torch.rand(H, dtype=torch.float64) - 0.2
    Bm, Cm = (torch.randn(b, L, G, N, dtype=torch.float64) for _ in range(2))
    h0 = torch.zeros(b, H, P, N, dtype=torch.float64, requires_grad=True)
    y, ht = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 16, initial_states=h0,
                                         return_final_states=True, backend="reference")
    want, = torch.autograd.grad(y, h0, dy)
    dev = lambda t: t.float().to(DEVICE).contiguous()  # noqa: E731
    got = la_final_state(dev(Cm), dev(Bm), dev(x), None, vs=dev(dt), A=dev(A))
    torch.testing.assert_close(got.cpu().double().transpose(-1, -2), ht.detach(), rtol=1e-4,
                               atol=1e-4)
    mu = la_state_adjoint(dev(Cm), dev(dy), None, 1.0, vs=dev(dt), A=dev(A))
    torch.testing.assert_close(mu.cpu().double().transpose(-1, -2), want, rtol=1e-4, atol=1e-4)


# ---- a group of one playing a later rank (what bench/gpu_cp.py times) -------------------------

def _sim_worker(rank, world, store_path, result_dir):
    """One process, a group of one, every op through the Triton kernels on CPU tensors, in three
    modes against the plain call: the group-of-one shortcut and the first rank's full path
    (`core._FORCE_EXCHANGE`: the plain call plus the exchange each way) must both be bitwise the
    plain call from zero (outputs, final states, every gradient); a simulated later rank
    (`core._SIMULATE_LATER`) must be bitwise the plain call from the incoming state in its outputs,
    and match it in final states and gradients."""
    import torch.distributed as dist
    from ssm_kernels.distributed import core
    torch.set_num_threads(1)
    failures = []
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
        pg = dist.group.WORLD
        torch.manual_seed(0)
        B, T, H, K, V, D = 2, 9, 2, 4, 3, 5
        q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        g = -torch.rand(B, T, H) * 0.3
        a, bb = torch.rand(B, T, D) * 0.5 + 0.5, torch.randn(B, T, D)
        xm, zm = torch.randn(B, T, H, V), torch.randn(B, T, H, V)
        dtm, Bm, Cm = torch.rand(B, T, H) * 0.5, torch.randn(B, T, 1, K), torch.randn(B, T, 1, K)
        Am, Dm, bm = -torch.rand(H) - 0.5, torch.randn(H), torch.randn(H) * 0.1
        kpos = torch.rand(B, T, H, K) + 0.1   # normalize=True: a positive key sum
        cases = {
            "linear_scan": ((a, bb), [torch.randn(B, D)],
                            lambda x, h0, pg: _pair(sk.linear_scan(
                                *x, h0 and h0[0], output_final_state=True, backend="triton",
                                process_group=pg))),
            "chunk_simple_gla": ((q, k, v, g), [torch.randn(B, H, K, K)],
                                 lambda x, h0, pg: _pair(sk.chunk_simple_gla(
                                     *x, initial_state=h0 and h0[0], output_final_state=True,
                                     backend="triton", process_group=pg))),
            "chunk_linear_attn normalize": (
                (q.abs(), kpos, v), [torch.randn(B, H, K, K), torch.rand(B, 1, H, K) + 1],
                lambda x, h0, pg: (lambda o, st: (o, tuple(st)))(*sk.chunk_linear_attn(
                    *x, initial_state=h0 and tuple(h0), output_final_state=True,
                    backend="triton", process_group=pg))),
            "mamba_chunk_scan_combined D, z": (
                (xm, dtm, Bm, Cm, zm), [torch.randn(B, H, V, K)],
                lambda x, h0, pg: _pair(sk.mamba_chunk_scan_combined(
                    x[0], x[1], Am, x[2], x[3], 4, D=Dm, z=x[4], dt_bias=bm,
                    initial_states=h0 and h0[0], dt_softplus=True, return_final_states=True,
                    backend="triton", process_group=pg))),
            "chunk_gated_delta_rule GVA l2norm": (
                (q[:, :, :1], k[:, :, :1], xm, g, torch.rand(B, T, H)), [torch.randn(B, H, K, V)],
                lambda x, h0, pg: _pair(sk.chunk_gated_delta_rule(
                    *x, initial_state=h0 and h0[0], output_final_state=True,
                    use_qk_l2norm_in_kernel=True, backend="triton", process_group=pg))),
        }

        def train(call, xs, h0, pg, w_out, w_fin):
            ins = [t.clone().requires_grad_() for t in xs]
            out, fin = call(ins, h0, pg)
            loss = (out * w_out).sum() + sum((f * w).sum() for f, w in zip(fin, w_fin))
            loss.backward()
            return out, fin, [t.grad for t in ins], loss.grad_fn

        for name, (xs, h_prev, call) in cases.items():
            out0, fin0 = call(xs, None, None)
            w_out, w_fin = torch.randn_like(out0), [torch.randn_like(f) for f in fin0]
            plain = train(call, xs, None, None, w_out, w_fin)
            for mode in ("group of one", "first rank (forced exchange)"):
                core._FORCE_EXCHANGE = mode != "group of one"
                try:
                    got = train(call, xs, None, pg, w_out, w_fin)
                    with torch.no_grad():
                        ni = call(xs, None, pg)
                finally:
                    core._FORCE_EXCHANGE = False
                bad = [what for what, x, y in [("out", got[0], plain[0]), ("no_grad out", ni[0], out0)]
                       + [(f"final {i}", x, y) for i, (x, y) in enumerate(zip(got[1], plain[1]))]
                       + [(f"no_grad final {i}", x, y) for i, (x, y) in enumerate(zip(ni[1], fin0))]
                       + [(f"grad {i}", x, y) for i, (x, y) in enumerate(zip(got[2], plain[2]))]
                       if not torch.equal(x, y)]
                if bad:
                    failures.append(f"{name} {mode}: not bitwise the plain call: {bad}")
                nodes, stack = set(), [got[3]]
                while stack:   # the group-of-one shortcut builds no CP node
                    fn = stack.pop()
                    if fn is None or fn in nodes:
                        continue
                    nodes.add(fn)
                    stack.extend(f for f, _ in fn.next_functions)
                has_node = any("_CPNode" in type(fn).__name__ for fn in nodes)
                if has_node != (mode != "group of one"):
                    failures.append(f"{name} {mode}: CP autograd node present: {has_node}")
            ref = train(call, xs, h_prev, None, w_out, w_fin)
            core._SIMULATE_LATER = h_prev
            try:
                got = train(call, xs, None, pg, w_out, w_fin)
            finally:
                core._SIMULATE_LATER = None
            if not torch.equal(got[0], ref[0]):   # the same op call from the same state: bitwise
                failures.append(f"{name}: simulated later rank's output differs from the plain call")
            for i, (c, p_) in enumerate(zip(got[1], ref[1])):
                if not torch.allclose(c, p_, rtol=1e-5, atol=1e-5):
                    failures.append(f"{name}: final {i} off by {(c - p_).abs().max():.3g}")
            for i, (c, p_) in enumerate(zip(got[2], ref[2])):
                if not torch.allclose(c, p_, rtol=1e-5, atol=1e-5):
                    failures.append(f"{name}: grad {i} off by {(c - p_).abs().max():.3g}")
        dist.destroy_process_group()
    except Exception:
        failures.append(traceback.format_exc())
    with open(os.path.join(result_dir, "rank0.txt"), "w") as f:
        f.write("\n".join(failures))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the Triton kernels on CPU tensors (interpreter)")
def test_group_of_one_first_rank_and_simulated_later_rank_match_the_plain_call():
    """See `_sim_worker`: a group of one is exactly the plain call (no collective, no CP node); the
    first rank's full path is bitwise the plain call; a simulated later rank (the benchmark's mode)
    matches the plain call from its incoming state."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_sim_worker, args=(1, os.path.join(tmp, "store"), tmp), nprocs=1,
                           join=True, start_method="fork")
        text = open(os.path.join(tmp, "rank0.txt")).read()
    assert not text, text
