"""The recall example's smoke size runs end to end on the CPU (every mixer, a few steps)."""
import pytest
import torch

from ssm_kernels.examples import recall


def test_mqar_batch_is_well_formed():
    tokens, labels = recall.mqar_batch(3, 40, 5, 64, "cpu", torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (3, 40)
    for b in range(3):
        kv = dict(zip(tokens[b, 0:10:2].tolist(), tokens[b, 1:10:2].tolist()))
        assert len(kv) == 5 and all(0 < k < 32 <= v < 64 for k, v in kv.items())
        q = (labels[b] != -100).nonzero().flatten().tolist()
        assert len(q) == 5 and min(q) >= 10
        for p in q:  # every query asks a key of this sequence; the label is its value
            assert kv[tokens[b, p].item()] == labels[b, p].item()


def test_tiny_run(tmp_path):
    rows = recall.main(["--tiny", "--out", str(tmp_path)])
    assert {r["mixer"] for r in rows} == set(recall.MIXERS)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_bytes"] > 0 for r in rows)
    assert (tmp_path / "recall.csv").exists()


def test_attention_learns_recall_on_cpu(tmp_path):
    """The task is learnable as set up (data, labels, rotary attention, optimizer): a two-layer
    d=32 attention model goes from chance (1/16 over the values) past the copy-any-value plateau
    (1/4 with 4 pairs) to near-perfect recall (NOTES 'recall example': 300 steps give 1.000 /
    0.996 / 0.993 / 0.915 for seeds 0-3; 400 here for margin, about 15 s on one core). A
    regression in any of those pieces (e.g. attention without positions: 0.84 after 300 steps)
    fails it. One thread: on a busy 2-core CI box more threads made it 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = recall.main(["--mixers", "attention", "--dims", "32", "--seq-len", "32",
                            "--pairs", "4", "--vocab", "32", "--batch", "64", "--steps", "400",
                            "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rows[0]["accuracy"] >= 0.9, rows


def test_rotary_is_a_relative_position_rotation():
    """Scores of rotated q/k depend only on the offset; norms are kept."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g), torch.randn(32, generator=g)
    Q = recall.rotary(q.expand(1, 1, 64, 32).contiguous())[0, 0]
    K = recall.rotary(k.expand(1, 1, 64, 32).contiguous())[0, 0]
    torch.testing.assert_close(Q[10] @ K[5], Q[40] @ K[35])
    torch.testing.assert_close(Q.norm(dim=-1), q.norm().expand(64))
    assert not torch.allclose(Q[10] @ K[5], Q[10] @ K[6])


def test_onecycle_table_is_the_schedulers_lr_and_beta1():
    """The graph step's schedule table holds, row by row, the lr and beta1 that the eager loop's
    OneCycleLR gives each optimizer step (momentum cycled: beta1 0.95 -> 0.85 -> 0.95)."""
    steps, lr = 50, 3e-3
    table = recall.onecycle_table(lr, steps)
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    seen = []
    for _ in range(steps):
        p.grad = torch.ones(3)
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    assert table.dtype == torch.float64 and table.shape == (steps, 2)
    assert table.tolist() == [list(r) for r in seen]
    assert table[:, 1].min() < 0.86 and table[0, 1] == table[-1, 1] == 0.95


def test_flat_adamw_matches_torch_adamw_with_clipping_and_decay():
    """FlatAdamW == clip_grad_norm_(1.0) + torch.optim.AdamW on param_groups-like groups (decay on
    the first only) + OneCycleLR, with gradients far above the clip norm and a parameter that gets
    no gradient (AdamW skips it; FlatAdamW updates it with a zero gradient: only decay-free
    parameters may be unused, so both leave it unchanged)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (7,), (3, 4), (2,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    ref = [x.clone().requires_grad_() for x in init]
    new = [x.clone().requires_grad_() for x in init]
    steps, lr, wd = 25, 3e-2, 0.1
    opt = torch.optim.AdamW([dict(params=ref[:2], weight_decay=wd),
                             dict(params=ref[2:], weight_decay=0.0)], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    flat = recall.FlatAdamW([dict(params=new[:2]), dict(params=new[2:])],
                            recall.onecycle_table(lr, steps), wd)
    clipped = 0
    for _ in range(steps):
        grads = [50 * torch.randn(s, generator=g) for s in shapes]
        for ps in (ref, new):
            for i, (p, gr) in enumerate(zip(ps, grads)):
                p.grad = None if i == 3 else gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        clipped += bool(norm > 1.0)
        opt.step()
        sched.step()
        flat.step()
        for a, b in zip(ref, new):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    assert clipped == steps
    assert torch.equal(new[3].detach(), init[3]) and not torch.equal(new[0].detach(), init[0])
    assert new[0].data_ptr() == flat.flat.data_ptr()   # the parameters are views of the buffer


def test_flat_steps_train_like_the_eager_loop():
    """The graph path's step (--step flat: the same FlatAdamW step, not captured) gives the eager
    loop's losses and parameters on the same data (two mixers, including Hyena's shared sine
    parameter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mixer in ("attention", "hyena"):
            res = {}
            for mode in ("eager", "flat"):
                args = recall.parse_args(["--mixers", mixer, "--dims", "16", "--seq-len", "32",
                                          "--pairs", "4", "--vocab", "32", "--batch", "8",
                                          "--steps", "12", "--layers", "1", "--step", mode])
                torch.manual_seed(0)
                model = recall.Model(mixer, args.vocab, 16, args.seq_len, 1, "reference")
                init = [p.detach().clone() for p in model.parameters()]
                gen = torch.Generator().manual_seed(0)
                dev = torch.device("cpu")
                it = (recall._eager_steps(model, args, dev, False, gen) if mode == "eager" else
                      recall._flat_steps(model, args, dev, False, gen, graph=False))
                losses = [loss.item() for _, loss, _, _ in it]
                res[mode] = losses, [p.detach().clone() for p in model.parameters()]
            (le, pe), (lf, pf) = res["eager"], res["flat"]
            assert len(le) == len(lf) == 12
            assert all(not torch.equal(a, b) for a, b in zip(pf, init) if a.ndim == 2)  # trained
            torch.testing.assert_close(torch.tensor(lf), torch.tensor(le), rtol=1e-5, atol=1e-5)
            for a, b in zip(pe, pf):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


# a CPU run small enough for a few seconds, long enough (6 steps) to reach the capture
SMALL = ["--device", "cpu", "--batch", "4", "--seq-len", "32", "--pairs", "4", "--layers", "1",
         "--eval-batches", "1", "--steps", "6"]


def test_graph_mode_falls_back_to_eager_when_capture_fails(tmp_path, capsys):
    """--step graph where no capture is possible (here: the CPU; the capture comes after the
    warm-up steps) prints why and trains the model again from scratch with eager steps: the same
    rows as --step eager."""
    argv = SMALL + ["--dims", "16", "--mixers", "gla", "mingru", "--out", str(tmp_path)]
    graph = recall.main(argv + ["--step", "graph"])
    out = capsys.readouterr().out
    assert out.count("CUDA graph capture failed (CUDA graphs need a CUDA device") == 2
    eager = recall.main(argv + ["--no-graph"])
    def drop(rows):   # the timings differ run to run
        return [{k: v for k, v in r.items() if k not in ("seconds", "step_ms")} for r in rows]
    assert drop(graph) == drop(eager) and all(r["mode"] == "eager" for r in graph)


def _capture_on_cpu(step, opt):
    """A CPU stand-in for `recall.capture_cuda` with a CUDA graph's semantics: recording changes
    nothing (the step runs once and its effects on the parameters, optimizer state and schedule
    position are undone), and each replay runs the step again, writing the same output tensors."""
    state = (opt.flat, opt.m, opt.v, opt.t, opt.idx)
    saved = [t.clone() for t in state]
    out = step()
    for t, v in zip(state, saved):
        t.copy_(v)

    def replay():
        for o, n in zip(out, step()):
            o.copy_(n)
    return replay, out


def test_graph_loop_runs_every_step_once_in_order(monkeypatch):
    """The graph loop's accounting -- WARMUP eager steps, the capture (which runs nothing), then
    one replay per remaining step, each fed a fresh batch before it -- gives the eager loop's
    losses and parameters step by step, with a capture stand-in that has a CUDA graph's
    semantics (a fed-after-replay or off-by-one schedule row would not)."""
    monkeypatch.setattr(recall, "CAPTURE", _capture_on_cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {}
        for mode in ("eager", "graph"):
            args = recall.parse_args(["--mixers", "gla", "--dims", "16", "--seq-len", "32",
                                      "--pairs", "4", "--vocab", "32", "--batch", "8",
                                      "--steps", "12", "--layers", "1", "--step", mode])
            torch.manual_seed(0)
            model = recall.Model("gla", args.vocab, 16, args.seq_len, 1, "reference")
            gen = torch.Generator().manual_seed(0)
            dev = torch.device("cpu")
            it = (recall._eager_steps(model, args, dev, False, gen) if mode == "eager" else
                  recall._flat_steps(model, args, dev, False, gen, graph=True))
            losses = [(s, loss.item()) for s, loss, _, _ in it]
            res[mode] = losses, [p.detach().clone() for p in model.parameters()]
        (le, pe), (lg, pg) = res["eager"], res["graph"]
        assert [s for s, _ in lg] == list(range(1, 13)) and recall.WARMUP < 12
        torch.testing.assert_close(torch.tensor([x for _, x in lg]),
                                   torch.tensor([x for _, x in le]), rtol=1e-5, atol=1e-5)
        for a, b in zip(pe, pg):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_graph_mode_falls_back_when_the_capture_raises(tmp_path, capsys, monkeypatch):
    """A capture that raises after the warm-up steps (an op that syncs, say) is printed and the
    model trained again from scratch with eager steps; other models still capture."""
    def capture(step, opt):
        if opt.params[0].shape[-1] == 16:      # the d=16 model only
            raise recall.CaptureError("RuntimeError: operation not permitted when stream is "
                                      "capturing")
        return _capture_on_cpu(step, opt)
    monkeypatch.setattr(recall, "CAPTURE", capture)
    argv = SMALL + ["--mixers", "mingru", "--dims", "16", "24", "--out", str(tmp_path)]
    rows = recall.main(argv + ["--step", "graph"])
    out = capsys.readouterr().out
    assert "mingru d=16: CUDA graph capture failed (RuntimeError: operation not permitted" in out
    assert [r["mode"] for r in rows] == ["eager", "graph"]
    eager = recall.main(argv + ["--step", "eager"])
    for g, e in zip(rows, eager):
        assert g["accuracy"] == e["accuracy"]
        assert abs(g["loss"] - e["loss"]) < 1e-3


def test_compile_all_ahead_leaves_nothing_to_compile_for_sm90():
    """recall.first_steps dry-run in one compiling_ahead block (as compile_all_ahead does on the
    GPU) compiles every Triton kernel the models' training and evaluation steps launch, offline
    for sm_90 (bench/recall_ahead_audit.py; Mamba-2: its inference forward takes other kernels)."""
    from conftest import REPO_ROOT, compile_for_sm90
    script = ("import runpy, sys; sys.argv = ['recall_ahead_audit.py', '--threads', '2', "
              "'--mixers', 'mamba2', '--dims', '64', '128']; "
              "runpy.run_path('bench/recall_ahead_audit.py', run_name='__main__')")
    res = compile_for_sm90(script, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    words = line.split()
    submitted, compiled, errors = int(words[1]), int(words[3]), int(words[5])
    assert submitted >= compiled >= 8 and errors == 0, line
    assert "dry runs stopped: []" in line and line.endswith("compiles in the real steps after: 0")


def test_steps_scale_trains_mamba_longer(tmp_path):
    """Mamba-1 gets `STEPS_SCALE` x --steps by default (it leaves the copy plateau late: NOTES
    "mamba10"); ``--steps-scale`` with no values trains every mixer for --steps; --tiny keeps
    equal steps; the trained row records the steps it ran."""
    a = recall.parse_args([])
    assert recall.mixer_steps("mamba", a) == 3 * a.steps == 4500
    assert recall.mixer_steps("gla", a) == recall.mixer_steps("attention", a) == a.steps
    assert recall.mixer_steps("mamba", recall.parse_args(["--steps-scale"])) == a.steps
    assert recall.parse_args(["--tiny"]).steps_scale == {}
    for bad in (["--steps-scale", "nope=2"], ["--steps-scale", "mamba"]):
        with pytest.raises(SystemExit):
            recall.parse_args(bad)
    rows = recall.main(["--mixers", "mamba", "--dims", "8", "--seq-len", "16", "--pairs", "2",
                        "--vocab", "16", "--batch", "2", "--steps", "2", "--layers", "1",
                        "--eval-batches", "1", "--steps-scale", "mamba=2", "--device", "cpu",
                        "--out", str(tmp_path)])
    assert rows[0]["steps"] == 4
