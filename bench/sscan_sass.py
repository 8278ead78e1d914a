"""Offline sm_90 audit of the selective-scan CUDA kernels (no GPU): registers/spills from ptxas and
SASS instruction counts of the chunk loop's phases, for one dtype: the forward's N <= 16 kernel
(lean; also its SSM_KERNELS_SSCAN_FWD_POLY=R builds) and N <= 32 bucket (general kernel), the
backward's N <= 16 variants 0, 2, 3.

    python bench/sscan_sass.py [--dtype bf16|fp16|fp32] [--keep DIR]

Compiles csrc/selective_scan/selective_scan_fwd.cu and selective_scan_fwd_lean.cu with setup.py's
nvcc flags for sm_90, dumps SASS (cuobjdump from $PATH, $CUDA_HOME/bin or Triton's bundled copy),
finds the chunk loop (the back edge spanning the loop's BAR.SYNCs) and splits it at its barriers:
general kernel: [stage+convert] BAR [compute] BAR [output]; lean: [stage+convert] BAR [compute+out].
The compute phase is straight-line code (kChunk steps x kNPT states unrolled), so its static count
is its per-chunk dynamic count; "instr/update" divides by kChunk * kNPT. The other phases contain
loops and data-dependent branches: reported as static counts with each inner loop's size.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-arch=sm_90",
         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
TNAME = {"bf16": "I13__nv_bfloat16", "fp16": "I6__half", "fp32": "If"}  # mangled: kernelI<T>...
# forward kernel -> (file, kernel template args after the dtype, kNPT, kTPC, kChunk, threads)
VARIANTS = {
    "lean N<=16": ("selective_scan_fwd_lean.cu", "Li4ELi4ELi128ELi32ELb1ELi0ELb0ELi4ELi1ELi0E", 4, 4, 32, 128),
    # SSM_KERNELS_SSCAN_FWD_POLY=R: 1/R of the decays by the FMA-pipe exp2 polynomial
    **{f"lean poly R={r}": ("selective_scan_fwd_lean.cu", f"Li4ELi4ELi128ELi32ELb1ELi{r}ELb0ELi4ELi1ELi0E", 4, 4, 32,
                            128) for r in (1, 2, 4, 8, 16)},
    # SSM_KERNELS_SSCAN_FWD_VARIANT=v: (coalesced PieceStager staging, y output group kOG)
    **{f"lean fwd variant {v}": ("selective_scan_fwd_lean.cu", f"Li4ELi4ELi128ELi32ELb1ELi0ELb{pc}ELi{og}ELi1ELi{s8}E",
                                 4, 4, 32, 128)
       for v, (pc, og, s8) in {1: (1, 4, 0), 2: (1, 8, 0), 3: (1, 32, 0), 4: (0, 32, 0),
                                    # session 8: 16-byte (dt, dt u) loads (6), + packed B/C (7), + packed C (8)
                                    6: (1, 32, 1), 7: (1, 32, 2), 8: (1, 32, 3),
                                    # + lanes remapped (uniform-pair B/C loads): on 6 (9), on 7 (10)
                                    9: (1, 32, 5), 10: (1, 32, 6)}.items()},
    # variant 5: two channels per thread (64 threads; "kNPT" 8 = the updates per thread and step)
    "lean fwd variant 5": ("selective_scan_fwd_lean.cu", "Li4ELi4ELi64ELi32ELb1ELi0ELb1ELi16ELi2ELi0E", 8, 4, 32, 64),
    "general N<=32": ("selective_scan_fwd.cu", "Li8ELi4ELi32ELb0E", 8, 4, 32, 128),
}
# backward variant -> kernel template args after the dtype (N <= 16 bucket, B/C time-varying)
BWD_VARIANTS = {0: "Li4ELi4ELi64ELi8ELi1ELi0E", 2: "Li4ELi4ELi64ELi8ELi1ELi2E",
                3: "Li4ELi4ELi64ELi8ELi1ELi3E", 4: "Li4ELi4ELi64ELi8ELi1ELi4E",
                5: "Li4ELi4ELi64ELi8ELi1ELi5E", 6: "Li4ELi4ELi64ELi8ELi1ELi6E"}
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def cuobjdump() -> str:
    for c in (shutil.which("cuobjdump"),
              os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")):
        if c and os.path.exists(c):
            return c
    try:
        import triton
        c = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(c):
            return c
    except ImportError:
        pass
    sys.exit("cuobjdump not found")


def compile_cu(src: str, out: str) -> dict:
    """cubin; returns {mangled kernel: (registers, spill stores, spill loads)}."""
    cmd = ["nvcc", *FLAGS, "-I", os.path.join(ROOT, "csrc"), "-cubin", "-o", out,
           os.path.join(ROOT, "csrc", "selective_scan", src), "-Xptxas", "-v"]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            res.setdefault(cur, [0, 0, 0])[1:] = [int(m.group(1)), int(m.group(2))]
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            res.setdefault(cur, [0, 0, 0])[0] = int(m.group(1))
    return res


def functions(sass: str) -> dict:
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = INSN.search(line)
        if m and cur:
            out[cur].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def op(name: str) -> str:
    return name.split(".")[0]


def analyse(insns, kchunk, knpt):
    addr = [a for a, _, _ in insns]
    idx = {a: i for i, a in enumerate(addr)}
    bars = [i for i, (_, o, _) in enumerate(insns) if o.startswith("BAR.SYNC")]
    backs = []  # (target index, branch index)
    for i, (a, o, rest) in enumerate(insns):
        if op(o) == "BRA":
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < a and int(m.group(1), 16) in idx:
                backs.append((idx[int(m.group(1), 16)], i))
    loop = max((b for b in backs if any(b[0] <= x <= b[1] for x in bars)),
               key=lambda b: b[1] - b[0])
    targets = set()
    for a, o, rest in insns:
        m = re.search(r"0x([0-9a-f]+)", rest) if op(o) == "BRA" else None
        if m:
            targets.add(int(m.group(1), 16))
    lb = [x for x in bars if loop[0] <= x <= loop[1]]
    cuts = [loop[0], *lb, loop[1] + 1]
    phases = []
    for k in range(len(cuts) - 1):
        lo, hi = cuts[k], cuts[k + 1]
        hist = collections.Counter(op(o) for _, o, _ in insns[lo:hi])
        inner = [(t, b) for t, b in backs if lo <= t and b < hi and (t, b) != loop]
        run = best = 0  # longest branch-free run (no branch, no branch target inside)
        for a, o, _ in insns[lo:hi]:
            run = 1 if a in targets else run + 1
            best = max(best, run)
            if op(o) in ("BRA", "BSSY", "BSYNC", "EXIT", "BAR"):
                run = 0
        phases.append(dict(n=hi - lo, hist=hist, loops=[b - t + 1 for t, b in inner], run=best))
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=list(TNAME))
    ap.add_argument("--keep", default=None, help="directory to keep cubins/SASS in")
    a = ap.parse_args()
    tmp = a.keep or tempfile.mkdtemp(prefix="sscan_sass_")
    os.makedirs(tmp, exist_ok=True)
    regs, fns = {}, {}
    for src in sorted({v[0] for v in VARIANTS.values()} | {"selective_scan_bwd.cu"}):
        cub = os.path.join(tmp, src.replace(".cu", ".cubin"))
        regs.update(compile_cu(src, cub))
        sass = subprocess.run([cuobjdump(), "-sass", cub], capture_output=True, text=True,
                              check=True).stdout
        with open(cub.replace(".cubin", ".sass"), "w") as fh:
            fh.write(sass)
        fns.update(functions(sass))
    print(f"sm_90, {a.dtype} (SASS under {tmp})\n")
    print("| kernel | (kNPT, kTPC, chunk, threads) | regs / spill B | phase | static instr | "
          "MUFU | FFMA+FMUL | LDS | SHFL | FSEL | instr/update | inner loops (sizes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v, (src, targs, knpt, ktpc, kchunk, thr) in VARIANTS.items():
        name = next((f for f in fns if TNAME[a.dtype] + targs in f and
                     ("lean" in f) == ("lean" in src)), None)
        if name is None:
            print(f"| {v} | kernel not found ({targs}) |")
            continue
        r = regs.get(name, [0, 0, 0])
        ph = analyse(fns[name], kchunk, knpt)
        labels = (["wait", "stage+convert", "compute", "output"] if len(ph) == 4 else
                  ["wait", "stage+convert", "compute+output"] if len(ph) == 3 else
                  [f"phase {i}" for i in range(len(ph))])
        for lab, p in zip(labels, ph):
            h = p["hist"]
            per = (f"{p['n'] / (kchunk * knpt):.2f} (longest straight run {p['run']}: "
                   f"{p['run'] / (kchunk * knpt):.2f})" if lab.startswith("compute") else "")
            print(f"| {v} | ({knpt}, {ktpc}, {kchunk}, {thr}) | {r[0]} / {r[1]} | {lab} | {p['n']} | "
                  f"{h['MUFU']} | {h['FFMA'] + h['FMUL']} | {h['LDS']} | {h['SHFL']} | {h['FSEL']} | "
                  f"{per} | {p['loops'] or ''} |")

    # backward: static instructions between the chunk loop's barriers (convert | pass 1 + pass 2
    # up to the sub-chunk barrier | warp sums | output), with the inner loops' body sizes
    print("\nbackward (N <= 16, B/C varying; phases = the chunk loop split at its barriers)\n")
    print("| bwd variant | regs / spill B | phase static instr (inner loop body sizes) |")
    print("|---|---|---|")
    for v, targs in BWD_VARIANTS.items():
        name = next((f for f in fns if "bwd" in f and TNAME[a.dtype] + targs in f), None)
        if name is None:
            print(f"| {v} | kernel not found |")
            continue
        r = regs.get(name, [0, 0, 0])
        ins = fns[name]
        bars = [i for i, (_, o, _) in enumerate(ins) if o.startswith("BAR.SYNC")]
        cuts = [0, *bars, len(ins)]
        cells = []
        for k in range(len(cuts) - 1):
            lo, hi = cuts[k], cuts[k + 1]
            loops = []
            for i in range(lo, hi):
                adr, o, rest = ins[i]
                m = re.search(r"0x([0-9a-f]+)", rest) if op(o) == "BRA" else None
                if m and int(m.group(1), 16) < adr:
                    tgt = next((j for j in range(lo, i) if ins[j][0] == int(m.group(1), 16)), None)
                    if tgt is not None:
                        loops.append(i - tgt + 1)
            cells.append(f"{hi - lo} {loops}" if loops else f"{hi - lo}")
        print(f"| {v} | {r[0]} / {r[1]} | {' / '.join(cells)} |")


if __name__ == "__main__":
    main()
