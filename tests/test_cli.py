"""The command line and what a newcomer meets first: `check`, `bench`, `--version`, the env default,
backend discovery with and without Triton / numpy / matplotlib, and the packaging metadata.

Subprocesses simulate a missing package with `sys.modules[name] = None` (import then fails the way
it does when the package is absent); CI also installs into fresh virtual environments (.ci/run).
"""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import ssm_kernels as sk
from ssm_kernels import _backend, _checks
from ssm_kernels.__main__ import main
from ssm_kernels.testing import CheckRow, Verdict

from conftest import HAS_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, block=(), env=None, timeout=300):
    """`python -m ssm_kernels ARGS` in a fresh interpreter, with the packages in `block` made
    unimportable. Returns the finished process (text stdout/stderr)."""
    pre = "".join(f"sys.modules[{m!r}] = None; " for m in block)
    code = (f"import sys; {pre}import runpy; sys.argv = ['ssm_kernels'] + {list(args)!r}; "
            f"runpy.run_module('ssm_kernels', run_name='__main__', alter_sys=True)")
    full_env = dict(os.environ)
    full_env.pop("TRITON_INTERPRET", None)  # as a user's shell would be
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# ---- --version, help, usage errors ----------------------------------------------------------------


def test_version_flag_and_single_source(capsys):
    from ssm_kernels._version import __version__
    assert sk.__version__ == __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ssm_kernels {__version__}"


def test_help_lists_families_and_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for fam in _checks.FAMILIES:
        assert fam in out
    for opt in ("--ops", "--backends", "--device", "--full", "--seed", "--json", "--verbose"):
        assert opt in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for opt in ("--ops", "--out", "--quick"):
        assert opt in out


@pytest.mark.parametrize("argv,needle", [
    (["check", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["check", "--ops", "nope"], "invalid choice: 'nope'"),
    (["bench", "--ops", "nope"], "invalid choice: 'nope'"),
    (["check", "--backends", "fast"], "invalid choice: 'fast'"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a GPU")
def test_check_device_cuda_without_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a GPU")
def test_check_unavailable_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--backends", "cuda", "--ops", "linear_scan"])
    assert e.value.code == 2
    assert "--backends cuda" in capsys.readouterr().err


# ---- check ---------------------------------------------------------------------------------------------


def test_check_json_reports_backends_families_and_rows(capsys, tmp_path):
    path = tmp_path / "sub" / "check.json"
    rc = main(["check", "--ops", "linear_scan", "fft_conv", "--backends", "reference",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["failed"] == 0 and doc["passed"] == len(doc["rows"]) > 0
    assert doc["version"] == sk.__version__ and doc["full"] is False
    assert doc["backends"]["reference"] == {"ran": True, "reason": None}
    assert doc["backends"]["cuda"]["ran"] is False and doc["backends"]["cuda"]["reason"]
    assert {(f["family"], f["backend"]) for f in doc["families"]} == {
        ("linear_scan", "reference"), ("fft_conv", "reference")}
    assert {r["family"] for r in doc["rows"]} == {"linear_scan", "fft_conv"}
    # the human summary: backends line, per-family totals, closing count
    assert "backends run: reference" in out
    assert "backends skipped:" in out and "cuda:" in out
    assert "per family:" in out
    assert f"check: {doc['passed']} passed, 0 failed" in out


def test_check_jobs_run_pairs_in_worker_processes_with_the_same_inputs():
    """--jobs N: (family, backend) pairs cut into units of cases in spawned workers give the
    serial run's rows (each case is seeded alone), pairs in registry order."""
    fams = ["linear_scan", "causal_conv1d"]
    pairs = [(f, "reference") for f in fams]
    units = _checks.plan_units(pairs, {p: len(_checks.list_cases(*p, "cpu")) for p in pairs}, 2)
    assert len(units) > len(pairs)   # the pairs are cut into units of cases
    serial = _checks.run(fams, ["reference"], "cpu", jobs=1)
    parallel = _checks.run(fams, ["reference"], "cpu", jobs=2)
    assert [r.family for r in parallel] == fams
    for a, b in zip(serial, parallel):
        assert [(r.op, r.dtype, r.verdict.err, r.verdict.bound) for r in a.rows] == [
            (r.op, r.dtype, r.verdict.err, r.verdict.bound) for r in b.rows]
        assert b.seconds > 0 and b.error is None
    assert _checks.default_jobs("cpu", 10) == 1 and 1 <= _checks.default_jobs("cuda", 3) <= 3


def _pairs_and_cases():
    """A run's shape on a GPU host: every family x three backends, today's case counts (some
    pairs empty, one module without `cases()`)."""
    pairs = [(f, b) for f in _checks.FAMILIES for b in ("cuda", "triton", "reference")]
    n = {p: len(_checks.list_cases(*p, "cuda")) for p in pairs}
    n[("linear_scan", "reference")] = None
    return pairs, n


@pytest.mark.parametrize("jobs", [1, 2, 3, 8, 16, 64])
def test_check_units_cover_every_case_once_longest_first(jobs):
    """plan_units: every case of every pair in exactly one unit, a unit's cases consecutive and
    ascending, costs adding up to the pair's; one whole unit per pair in registry order for one
    worker; longest first otherwise, with the longest pair (delta_rule triton) cut so that no
    unit of several cases is over a worker's fair share."""
    pairs, n = _pairs_and_cases()
    units = _checks.plan_units(pairs, n, jobs)
    for p in pairs:
        mine = [u for u in units if (u.family, u.backend) == p]
        if n[p] is None:
            assert [u.cases for u in mine] == [None]
            continue
        got = [i for u in mine for i in u.cases]
        assert sorted(got) == list(range(n[p])), (p, got)
        for u in (u for u in mine if u.cases):
            assert list(u.cases) == list(range(u.cases[0], u.cases[0] + len(u.cases)))
        assert sum(u.cost for u in mine) == pytest.approx(_checks._cost(*p) if n[p] else 0.0)
    if jobs == 1:
        assert [(u.family, u.backend) for u in units] == pairs
        return
    assert [u.cost for u in units] == sorted((u.cost for u in units), reverse=True)
    total = sum(u.cost for u in units)
    delta = [u for u in units if (u.family, u.backend) == ("delta_rule", "triton")]
    assert len(delta) == min(n[("delta_rule", "triton")], math.ceil(63 / (total / (2 * jobs))))
    assert len(delta) > 1
    assert all(u.cost <= total / jobs for u in units if u.cases and len(u.cases) > 1)
    assert units[0].family in ("delta_rule", "linear_attn", "based")
    whole = _checks.plan_units(pairs, n, jobs, split=False)   # SSM_KERNELS_CHECK_SPLIT=0
    assert sorted((u.family, u.backend) for u in whole) == sorted(pairs)
    assert (whole[0].family, whole[0].backend) == ("delta_rule", "triton")


def test_check_units_merge_back_in_case_order_whatever_finishes_first(monkeypatch):
    """Units run in any order (here: the reverse of the plan, the RNG disturbed in between) give
    the serial run's rows: each case is seeded alone; rows come back per pair in case order,
    pairs in registry order, seconds summed, each pair reported once when its last unit is in."""
    def cases(backend, device, full=False):
        return [f"case{i}" for i in range(5 if backend == "reference" else 3)]

    def check_case(backend, device, case):
        x = torch.rand(2)   # the case's inputs: from its own seed
        return [CheckRow(f"{case} {name}", backend, "float32", Verdict(name, float(v), 1.0))
                for name, v in zip(("out", "grad"), x)]
    mod = types.ModuleType("ssm_kernels_fake_cases")
    mod.cases, mod.check_case = cases, check_case
    mod.check = lambda backend, device, full=False: [
        r for c in cases(backend, device, full) for r in check_case(backend, device, c)]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(_checks.FAMILIES, "linear_scan", mod.__name__)
    monkeypatch.setitem(_checks.FAMILIES, "based", mod.__name__)
    fams, bes = ["linear_scan", "based"], ["triton", "reference"]
    seen = []
    serial = _checks.run(fams, bes, "cpu", seed=3, jobs=1, on_result=seen.append)
    assert [(r.family, r.backend) for r in seen] == [(f, b) for f in fams for b in bes]

    pairs = [(f, b) for f in fams for b in bes]
    n = {p: _checks.list_cases(*p, "cpu") and len(_checks.list_cases(*p, "cpu")) for p in pairs}
    units = _checks.plan_units(pairs, n, jobs=4)
    assert len(units) > len(pairs)   # some pair is cut

    def finished():
        for u in reversed(units):
            torch.rand(7)
            yield u, _checks._run_unit(u, "cpu", False, 3)
    reported = []
    sharded = _checks.collect(pairs, units, finished(), reported.append)
    assert sorted((r.family, r.backend) for r in reported) == sorted(pairs)
    assert [(r.family, r.backend) for r in sharded] == pairs
    for a, b in zip(serial, sharded):
        assert [(r.op, r.verdict.err) for r in a.rows] == [(r.op, r.verdict.err) for r in b.rows]
        assert [r.op.split()[0] for r in b.rows][::2] == cases(b.backend, "cpu")
    # the same rows with a different seed would differ: the seed reaches every case
    other = _checks.run(fams, bes, "cpu", seed=4, jobs=1)
    assert [r.verdict.err for r in other[0].rows] != [r.verdict.err for r in serial[0].rows]


def test_check_json_on_stdout_keeps_stdout_parseable(capsys):
    rc = main(["check", "--ops", "linear_scan", "--backends", "reference", "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    doc = json.loads(cap.out)
    assert doc["failed"] == 0
    assert "per family:" in cap.err


def _fake_family(monkeypatch, check):
    mod = types.ModuleType("ssm_kernels_fake_check")
    mod.check = check
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(_checks.FAMILIES, "linear_scan", mod.__name__)


def test_check_exits_1_on_a_failure_and_prints_the_failing_row(monkeypatch, capsys):
    def check(backend, device, full=False):
        return [CheckRow("fake ok", backend, "float32", Verdict("ok", 1e-7, 1e-5)),
                CheckRow("fake wrong", backend, "float32", Verdict("wrong", 1.0, 1e-5))]
    _fake_family(monkeypatch, check)
    rc = main(["check", "--ops", "linear_scan", "--backends", "reference"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "fake wrong" in out
    assert "check: 1 passed, 1 failed" in out


def test_check_reports_a_crash_as_a_failure(monkeypatch, capsys):
    def check(backend, device, full=False):
        raise RuntimeError("boom in the kernel")
    _fake_family(monkeypatch, check)
    rc = main(["check", "--ops", "linear_scan", "--backends", "reference", "-v"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "boom in the kernel" in out and "Traceback" in out


def test_check_full_flag_reaches_the_families(monkeypatch, capsys):
    seen = []

    def check(backend, device, full=False):
        seen.append(full)
        return [CheckRow("fake", backend, "float32", Verdict("ok", 0.0, 1e-5))]
    _fake_family(monkeypatch, check)
    assert main(["check", "--ops", "linear_scan", "--backends", "reference", "--full"]) == 0
    assert main(["check", "--ops", "linear_scan", "--backends", "reference"]) == 0
    assert seen == [True, False]


@pytest.mark.parametrize("family", list(_checks.FAMILIES))
def test_quick_depth_covers_every_op_of_the_full_sweep(family):
    """On the reference (cheap here), quick checks every op and gradient the full sweep does."""
    import importlib
    mod = importlib.import_module(_checks.FAMILIES[family])
    torch.manual_seed(0)
    quick = mod.check("reference", "cpu", full=False)
    full = mod.check("reference", "cpu", full=True)
    assert 0 < len(quick) <= len(full)
    assert all(r.verdict.ok for r in quick + full)

    def what(r):  # the op and output, without shape/dtype details
        return " ".join(w for w in r.op.split() if "=" not in w)
    assert {what(r) for r in quick} == {what(r) for r in full}


@pytest.mark.skipif(HAS_GPU, reason="CPU timing budget")
def test_default_check_runs_everything_quickly_on_cpu():
    """The README's `python -m ssm_kernels check`: every family on every backend available here,
    well inside the 90 s budget for a 2-core CPU, exit 0, one closing count line."""
    p = run_cli(["check", "--json", "-"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    ran = [b for b, v in doc["backends"].items() if v["ran"]]
    assert "reference" in ran
    assert {(f["family"], f["backend"]) for f in doc["families"]} == {
        (fam, b) for fam in _checks.FAMILIES for b in ran}
    assert doc["failed"] == 0
    assert doc["seconds"] < 90, doc["seconds"]
    assert f"check: {doc['passed']} passed, 0 failed" in p.stderr


# ---- optional dependencies: triton, numpy, matplotlib -------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="simulates a CPU machine")
def test_check_and_bench_without_triton():
    p = run_cli(["check", "--ops", "linear_scan", "selective_scan"], block=["triton"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backends run: reference" in p.stdout
    assert "triton: triton is not installed" in p.stdout
    p = run_cli(["bench", "--quick", "--ops", "linear_scan", "fft_conv", "--out",
                 os.path.join(ROOT, ".pytest_cache", "cli_bench", "r.csv")], block=["triton"])
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "SMOKE RUN" in p.stdout and "ssm_kernels.reference" in p.stdout
    assert "failed" not in p.stdout.split("cases timed")[-1]


@pytest.mark.skipif(HAS_GPU, reason="simulates a CPU machine")
def test_interpreter_without_numpy_is_explained_not_mistaken_for_missing_triton():
    p = run_cli(["check", "--ops", "linear_scan"], block=["numpy"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "triton is not installed" not in p.stdout
    assert "numpy" in p.stdout.split("backends skipped:")[1].split("family")[0]
    p = run_cli(["bench", "--quick", "--ops", "linear_scan", "--out",
                 os.path.join(ROOT, ".pytest_cache", "cli_bench_nonumpy", "r.csv")], block=["numpy"])
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "no plot:" in p.stdout  # matplotlib needs numpy: said, not silent


def test_bench_quick_smoke_writes_csv_and_one_png_per_family(tmp_path, capsys):
    if HAS_GPU:
        pytest.skip("a GPU bench takes minutes")
    out = tmp_path / "results.csv"
    rc = main(["bench", "--quick", "--ops", "fft_conv", "linear_attn", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SMOKE RUN" in text and "not benchmarks" in text
    assert "GB/s" not in text.split("SMOKE RUN")[1].split("\n")[2]  # no rates on a CPU
    import csv
    rows = list(csv.DictReader(open(out)))
    assert {r["family"] for r in rows} == {"fft_conv", "linear_attn"}
    assert all(r["first_call_ms"] for r in rows)
    ours = [r for r in rows if r["impl"].startswith("ssm_kernels") and r["family"] == "fft_conv"]
    assert ours and all(r["speedup_vs_best_peer"] for r in ours)  # torch.fft is the peer
    # the table is printed once: each case appears on one line only
    assert text.count("torch.fft ") == 2 + 2  # two table lines (fwd, fwd+bwd) + two summary lines
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib" in text
    else:
        assert (tmp_path / "results_fft_conv.png").exists()
        assert (tmp_path / "results_linear_attn.png").exists()


def test_format_table_and_plot_take_empty_rows(tmp_path):
    from ssm_kernels.benchmarks.harness import format_table, plot
    assert format_table([]).split() == ["op", "impl", "mode", "dtype", "ms", "first_call_ms", "GB/s",
                                        "TFLOP/s", "pct_of_floor", "speedup_vs_best_peer", "shape"]
    assert plot([], str(tmp_path / "r.csv")) == []


def test_speedups_treat_baseline_ops_as_peers_of_every_op():
    from ssm_kernels.benchmarks.harness import add_speedups, summary_lines
    common = dict(family="linear_attn", mode="fwd", shape="B=1", dtype="bfloat16")
    rows = [dict(op="chunk_gla", impl="ssm_kernels.triton", ms=2.0, **common),
            dict(op="chunk_gla", impl="fla.chunk_gla", ms=1.0, **common),
            dict(op="chunk_linear_attn", impl="ssm_kernels.triton", ms=1.0, **common),
            dict(op="sdpa_causal", impl="torch.sdpa", ms=4.0, **common)]
    add_speedups(rows)
    assert rows[0]["speedup_vs_best_peer"] == 0.5    # fla is the best peer of chunk_gla
    assert rows[2]["speedup_vs_best_peer"] == 4.0    # SDPA is the peer of chunk_linear_attn
    assert len(summary_lines(rows)) == 2


def test_bench_without_torch_peers_or_gpu_timer_fallback():
    """do_bench falls back to CUDA events when triton is absent; on a CPU it is never called."""
    from ssm_kernels.benchmarks import harness
    case = harness.Case("x", "ssm_kernels.reference", "fwd", "s", "float32", lambda: None, bytes=1.0)
    row = harness.time_case(case, None)
    assert row["GB/s"] == "" and row["pct_of_floor"] == "" and row["first_call_ms"] >= 0


# ---- backends: env default, discovery, auto vs the interpreter ---------------------------------------


def test_bad_env_backend_fails_at_import_naming_variable_and_value():
    p = subprocess.run([sys.executable, "-c", "import ssm_kernels"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "SSM_KERNELS_BACKEND": "garbage"}, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "SSM_KERNELS_BACKEND" in last and "'garbage'" in last and "reference" in last


def test_explicit_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, reference"):
        sk.linear_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), backend="fast")


def test_available_backends_defaults_to_the_device_tensors_live_on():
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert sk.available_backends() == sk.available_backends(here)
    assert "reference" in sk.available_backends()


@pytest.mark.skipif(HAS_GPU, reason="the interpreter question is a CPU one")
def test_auto_never_picks_the_interpreter_but_explicit_triton_runs_it(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: kernels run in the interpreter
    cpu = torch.device("cpu")
    supports = {"triton": lambda: _backend.triton_reason(cpu), "reference": lambda: None}
    assert _backend.resolve("op", "auto", supports) == "reference"
    if _backend.triton_import_error() is None:
        assert _backend.resolve("op", "triton", supports) == "triton"
        assert "triton" in sk.available_backends("cpu")
    # end to end: auto on CPU tensors must not enter the Triton launcher
    import importlib
    lt = importlib.import_module("ssm_kernels.linear_scan.triton")

    def boom(*a, **k):
        raise AssertionError("auto picked the Triton interpreter")
    monkeypatch.setattr(lt, "linear_scan_fwd", boom)
    h = sk.linear_scan(torch.rand(2, 7, 3), torch.randn(2, 7, 3))
    assert h.shape == (2, 7, 3)


@pytest.mark.skipif(HAS_GPU, reason="CPU message")
def test_triton_on_cpu_without_interpreter_explains_the_reference():
    r = subprocess.run([sys.executable, "-c",
                        "import torch, ssm_kernels as sk\n"
                        "try:\n    sk.linear_scan(torch.rand(1,3,2), torch.rand(1,3,2), backend='triton')\n"
                        "except sk.BackendUnavailableError as e:\n    print(e)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert "linear_scan" in r.stdout and "reference serves CPU tensors" in r.stdout


# ---- packaging ------------------------------------------------------------------------------------------


def test_packaging_metadata():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    proj = meta["project"]
    assert proj["dependencies"] == ["torch>=2.4"]  # triton is optional
    extras = proj["optional-dependencies"]
    for name in ("triton", "gpu", "test"):
        assert any(d.startswith("triton") for d in extras[name]) and "numpy" in extras[name]
    assert "matplotlib" in extras["bench"]
    assert proj["license"] == "Apache-2.0" and "version" in proj["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "ssm_kernels._version.__version__"
    assert proj["classifiers"]
    for f in ("LICENSE", "CHANGELOG.md", "MANIFEST.in", "ssm_kernels/py.typed"):
        assert os.path.exists(os.path.join(ROOT, f)), f
    manifest = open(os.path.join(ROOT, "MANIFEST.in")).read()
    assert "graft csrc" in manifest and "tests/*.py" in manifest


def test_import_does_not_import_triton():
    code = ("import sys, ssm_kernels\n"
            "assert 'triton' not in sys.modules, 'import ssm_kernels imported triton'\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
