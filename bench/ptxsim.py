"""Tiny PTX lane simulator (used by bench/ptx_bounds.py): the integer and address arithmetic of one
CTA, all lanes at once (numpy); every ld/st.global (and cp.async source) address is checked against
the tensor arguments' byte ranges, every shared access (and every wgmma operand's descriptor
range) against the kernel's shared size. Float
values are not modelled (zeros): no address depends on them; a branch whose predicate differs
between lanes raises (none in the kernels audited)."""
import os
import re

import numpy as np

M32 = 0xFFFFFFFF


def s32(x):
    x = np.asarray(x, dtype=np.int64) & M32
    return np.where(x >= 1 << 31, x - (1 << 32), x)


def u32(x):
    return np.asarray(x, dtype=np.int64) & M32


def wrap64(x):
    return np.asarray(x).astype(np.int64)


def split_ops(s):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip()); cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse(ptx):
    lines, labels = [], {}
    body = False
    for raw in ptx.splitlines():
        s = raw.split("//")[0].strip()
        if not body:
            body = s == "{"
            continue
        if not s or s.startswith(".") or s in ("{", "}") or s.startswith("$L__func") or s.startswith("%bb"):
            continue
        if re.match(r"^\$L\w+:$", s):
            labels[s[:-1]] = len(lines)
            continue
        if s.endswith(";"):
            s = s[:-1].strip()
        pred = None
        m = re.match(r"^@(!?)(%p\d+)\s+(.*)$", s)
        if m:
            pred = (m.group(1) == "!", m.group(2))
            s = m.group(3)
        parts = s.split(None, 1)
        op = parts[0]
        ops = split_ops(parts[1]) if len(parts) > 1 else []
        lines.append((op, ops, pred, raw.strip()))
    return lines, labels


class Sim:
    def __init__(self, ptx, params, ctaid, tensors, smem, nthreads=128):
        self.lines, self.labels = parse(ptx)
        self.params = params      # index -> int
        self.ctaid = ctaid
        self.tensors = tensors    # list of (lo, hi, name)
        self.smem = smem
        self.N = nthreads
        self.R = {}
        self.lane = np.arange(nthreads, dtype=np.int64)
        self.bad = []
        self.nglobal = 0

    def val(self, o):
        o = o.strip()
        if o.startswith("%"):
            if o == "%tid.x":
                return self.lane.copy()
            if o in ("%tid.y", "%tid.z"):
                return np.zeros(self.N, np.int64)
            if o.startswith("%ctaid."):
                return np.full(self.N, self.ctaid["xyz".index(o[-1])], np.int64)
            if o == "%laneid":
                return self.lane % 32
            if o == "%warpid":
                return self.lane // 32
            return self.R.get(o, np.zeros(self.N, np.int64))
        if o == "global_smem":
            return np.zeros(self.N, np.int64)
        if o.startswith("0f") or o.startswith("0d"):
            return np.zeros(self.N, np.int64)
        if o.startswith("0x") or o.startswith("-0x"):
            return np.full(self.N, int(o, 16), np.int64) if abs(int(o, 16)) < 1 << 63 else \
                np.full(self.N, int(o, 16) - (1 << 64), np.int64)
        try:
            v = int(o)
            if v >= 1 << 63:
                v -= 1 << 64
            return np.full(self.N, v, np.int64)
        except ValueError:
            return np.zeros(self.N, np.int64)

    def setr(self, d, v):
        for name in d.split("|"):
            self.R[name.strip()] = np.asarray(v)
            break

    def mem(self, o):
        m = re.match(r"^\[\s*(%?\w+)\s*(?:\+\s*(-?\w+))?\s*\]$", o.strip())
        base = self.val(m.group(1))
        off = int(m.group(2), 0) if m.group(2) else 0
        return base + off

    def check_global(self, addr, size, act, what):
        self.nglobal += int(act.sum())
        a = addr[act]
        if a.size == 0:
            return
        ok = np.zeros(a.shape, bool)
        for lo, hi, _ in self.tensors:
            ok |= (a >= lo) & (a + size <= hi)
        if not ok.all():
            b = int(a[~ok][0])
            near = min(self.tensors, key=lambda t: min(abs(b - t[0]), abs(b - t[1])))
            self.bad.append(f"{what}: {int((~ok).sum())} lanes out of bounds, e.g. {near[2]} "
                            f"byte {b - near[0]} (size {near[1] - near[0]})")

    def check_shared(self, addr, size, act, what):
        a = addr[act]
        if a.size and ((a < 0).any() or (a + size > self.smem).any()):
            self.bad.append(f"{what}: shared [{int(a.min())}, {int(a.max()) + size}) vs {self.smem}")

    # MN-major operands: which descriptor field strides the MN atoms ("lbo", CUTLASS's canonical
    # layout) and which the 8-row K groups; calibrated on kernels that run on the H100 (NOTES, dfwd8)
    MN_ATOM_STRIDE = os.environ.get("PTXSIM_MN_ATOM", "lbo")

    def desc_range(self, desc, rows_mn, k_elems, esz, mn_major):
        """[lo, hi) bytes of shared memory a wgmma operand descriptor reads (swizzled layouts):
        K-major: rows_mn rows of S (swizzle width) bytes in 8-row groups SBO apart (LBO unused);
        MN-major: k_elems K-rows of S bytes in 8-row groups, MN atoms of S / esz elements."""
        start = (desc & 0x3FFF) << 4
        lbo = ((desc >> 16) & 0x3FFF) << 4
        sbo = ((desc >> 32) & 0x3FFF) << 4
        S = {1: 128, 2: 64, 3: 32}.get(int((desc >> 62) & 3))
        if S is None:
            return None
        lo = start - start % S
        if not mn_major:
            return lo, lo + 8 * S + (-(-rows_mn // 8) - 1) * sbo
        atom, group = (lbo, sbo) if self.MN_ATOM_STRIDE == "lbo" else (sbo, lbo)
        atoms, groups = -(-(rows_mn * esz) // S), -(-k_elems // 8)
        return lo, lo + 8 * S + (groups - 1) * group + (atoms - 1) * atom

    def check_wgmma(self, op, ops, raw):
        m = re.search(r"\.m(\d+)n(\d+)k(\d+)\.\w+\.(\w+)\.(\w+)$", op)
        M, N, K, ta = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        esz = {"bf16": 2, "f16": 2, "tf32": 4, "e4m3": 1, "e5m2": 1, "s8": 1, "u8": 1}[ta]
        imms = [o for o in ops[3:] if re.fullmatch(r"-?\d+", o)]
        if esz != 2:
            trans = [0, 0]          # tf32 / 8-bit: K-major only
        elif ops[1].startswith("{"):
            trans = [0, int(imms[-1])]   # A from registers: (scale-a, scale-b, trans-b)
        else:
            trans = [int(x) for x in imms[-2:]]
        self.nwgmma = getattr(self, "nwgmma", 0) + 1
        for which, o, rows, mn_major in (("A", ops[1], M, trans[0]), ("B", ops[2], N, trans[1])):
            if o.startswith("{"):
                continue    # A from registers
            d = self.val(o)
            for wg in range(0, self.N, 128):   # one descriptor per warp group
                dw = d[wg:wg + 128]
                if not (dw == dw[0]).all():
                    self.bad.append(f"{raw}: {which} descriptor differs inside warp group {wg // 128}")
                    continue
                r = self.desc_range(int(dw[0]) & ((1 << 64) - 1), rows, K, esz, mn_major)
                if r is None:
                    self.bad.append(f"{raw}: {which} descriptor without swizzle (not modelled)")
                elif r[0] < 0 or r[1] > self.smem:
                    self.bad.append(f"{raw}: {which} operand reads shared [{r[0]}, {r[1]}) vs "
                                    f"{self.smem} (warp group {wg // 128})")

    def run(self, max_steps=10 ** 7):
        pc, steps = 0, 0
        L = self.lines
        while pc < len(L):
            steps += 1
            assert steps < max_steps
            op, ops, pred, raw = L[pc]
            pc += 1
            act = np.ones(self.N, bool)
            if pred is not None:
                p = self.R.get(pred[1], np.zeros(self.N, bool)).astype(bool)
                act = ~p if pred[0] else p
            base = op.split(".")[0]
            if base == "bra":
                if act.all() or not act.any():
                    if act.all():
                        pc = self.labels[ops[0]]
                    continue
                raise RuntimeError(f"divergent branch: {raw}")
            if base == "ret":
                break
            if base in ("bar", "fence", "membar") or op.startswith("wgmma.fence") or \
                    op.startswith("wgmma.commit") or op.startswith("wgmma.wait"):
                continue
            if op.startswith("wgmma.mma_async"):
                self.check_wgmma(op, ops, raw)
                for r in re.findall(r"%r\d+", ops[0]):
                    self.R[r] = np.zeros(self.N, np.int64)
                continue
            self.exec(op, ops, act, raw)
        return self

    def assign(self, d, v, act):
        v = np.asarray(v)
        if d.startswith("{"):
            for r in re.findall(r"%\w+", d):
                old = self.R.get(r, np.zeros(self.N, np.int64))
                self.R[r] = np.where(act, 0, old)
            return
        d = d.split("|")[0].strip()
        old = self.R.get(d)
        if old is None or act.all():
            self.R[d] = v if v.shape else np.full(self.N, v)
        else:
            self.R[d] = np.where(act, v, old)

    def exec(self, op, ops, act, raw):
        t = op.split(".")
        base = t[0]
        typ = t[-1]
        norm = (lambda x: s32(x) if typ == "s32" else u32(x)) if typ in ("s32", "u32", "b32") else wrap64
        if base == "ld" and "param" in op:
            idx = int(re.search(r"param_(\d+)", ops[1]).group(1))
            self.assign(ops[0], np.full(self.N, self.params.get(idx, 0), np.int64), act)
            return
        if base in ("ld", "st") and ".global" in op:
            size = {"b8": 1, "u8": 1, "b16": 2, "u16": 2, "b32": 4, "u32": 4, "f32": 4, "b64": 8,
                    "u64": 8, "f16": 2}[typ]
            vec = 4 if ".v4" in op else (2 if ".v2" in op else 1)
            addr = self.mem(ops[1] if base == "ld" else ops[0])
            self.check_global(addr, size * vec, act, raw)
            if base == "ld":
                self.assign(ops[0], 0, act)
            return
        if base == "cp" and op.startswith("cp.async.commit") or op.startswith("cp.async.wait"):
            return
        if op.startswith("cp.async") and ".shared.global" in op:
            dst, src = self.mem(ops[0]), self.mem(ops[1])
            cp = int(ops[2], 0)
            srcsz = self.val(ops[3]) if len(ops) > 3 else np.full(self.N, cp)
            self.check_shared(dst, cp, act, raw)
            self.check_global(src, 1, act & (srcsz > 0), raw)
            on = act & (srcsz > 0)
            if on.any():
                self.check_global(src + srcsz - 1, 1, on, raw + " (last byte)")
            return
        if (base in ("ld", "st") and ".shared" in op) or base in ("ldmatrix", "stmatrix"):
            if base in ("ldmatrix", "stmatrix"):
                size = 16
            else:
                size = {"b8": 1, "b16": 2, "b32": 4, "b64": 8, "f32": 4}[typ] * (
                    4 if ".v4" in op else (2 if ".v2" in op else 1))
            addr = self.mem(ops[1] if base in ("ld", "ldmatrix") else ops[0])
            self.check_shared(addr, size, act, raw)
            if base in ("ld", "ldmatrix"):
                self.assign(ops[0], 0, act)
            return
        if typ in ("f32", "f16", "bf16", "f64", "f16x2", "bf16x2") and base not in ("mov", "cvt", "setp", "selp"):
            self.assign(ops[0], 0, act)
            return
        if base == "setp":
            cmp = t[1]
            ty = t[2]
            if ty in ("f32", "f64"):
                self.assign(ops[0], np.zeros(self.N, bool), act)
                return
            a, b = self.val(ops[1]), self.val(ops[2])
            if ty in ("u32", "b32"):
                a, b = u32(a), u32(b)
            elif ty == "s32":
                a, b = s32(a), s32(b)
            elif ty in ("u64", "b64"):
                a, b = a.astype(np.uint64), b.astype(np.uint64)
            r = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b, "ne": a != b,
                 "lo": a < b, "hi": a > b, "ls": a <= b, "hs": a >= b}[cmp]
            self.assign(ops[0], r, act)
            return
        if typ == "pred":
            if base == "mov":
                v = self.val(ops[1]).astype(bool) if ops[1].startswith("%") else np.full(self.N, bool(int(ops[1])))
                self.assign(ops[0], v, act)
                return
            a = self.R.get(ops[1].lstrip("!"), np.zeros(self.N, bool)).astype(bool)
            if ops[1].startswith("!"):
                a = ~a
            if base == "not":
                self.assign(ops[0], ~a, act)
                return
            b = self.R.get(ops[2].lstrip("!"), np.zeros(self.N, bool)).astype(bool)
            if ops[2].startswith("!"):
                b = ~b
            self.assign(ops[0], {"and": a & b, "or": a | b, "xor": a ^ b}[base], act)
            return
        if base == "selp":
            p = self.R.get(ops[3], np.zeros(self.N, bool)).astype(bool)
            self.assign(ops[0], np.where(p, self.val(ops[1]), self.val(ops[2])), act)
            return
        if base == "mov":
            v = self.val(ops[1])
            self.assign(ops[0], v, act)
            return
        if base == "cvt":
            dst, src = t[-2], t[-1]
            if any(x.startswith("f") or x.startswith("bf") for x in (dst, src) if x not in ("rn", "rz", "rm", "rp", "sat", "ftz")):
                if any(x in ("f32", "f16", "bf16", "f64", "bf16x2", "f16x2") for x in t[1:]):
                    self.assign(ops[0], 0, act)
                    return
            v = self.val(ops[1])
            v = {"u32": u32, "s32": s32}.get(src, lambda x: x)(v)
            v = {"u32": u32, "s32": s32}.get(dst, wrap64)(v)
            self.assign(ops[0], v, act)
            return
        if base == "shfl":
            mode = t[2]
            a = self.val(ops[1])
            b = self.val(ops[2]) & 31
            lane = self.lane % 32
            if mode == "bfly":
                src = lane ^ b
            elif mode == "up":
                src = np.where(lane >= b, lane - b, lane)
            elif mode == "down":
                src = np.where(lane + b < 32, lane + b, lane)
            else:
                src = np.full(self.N, b) if False else lane
            self.assign(ops[0], a[(self.lane // 32) * 32 + src], act)
            return
        if base == "prmt":
            self.assign(ops[0], 0, act)
            return
        a = self.val(ops[1]) if len(ops) > 1 else None
        b = self.val(ops[2]) if len(ops) > 2 else None
        if base == "add":
            r = a + b
        elif base == "sub":
            r = a - b
        elif base == "neg":
            r = -a
        elif base == "mul":
            if t[1] == "wide":
                r = (s32(a) * s32(b)) if typ == "s32" else (u32(a) * u32(b))
                self.assign(ops[0], wrap64(r), act)
                return
            if t[1] == "hi":
                r = ((s32(a) * s32(b)) >> 32) if typ == "s32" else ((u32(a) * u32(b)) >> 32)
            else:
                r = a * b
        elif base == "mad":
            c = self.val(ops[3])
            if t[1] == "wide":
                r = ((s32(a) * s32(b)) if typ == "s32" else (u32(a) * u32(b))) + c
                self.assign(ops[0], wrap64(r), act)
                return
            r = a * b + c
        elif base == "shl":
            r = a << (u32(b) & 63)
        elif base == "shr":
            if typ == "s32":
                r = s32(a) >> u32(b)
            elif typ in ("u32", "b32"):
                r = u32(a) >> u32(b)
            elif typ == "s64":
                r = a >> b
            else:
                r = (a.astype(np.uint64) >> b.astype(np.uint64)).astype(np.int64)
        elif base == "and":
            r = a & b
        elif base == "or":
            r = a | b
        elif base == "xor":
            r = a ^ b
        elif base == "not":
            r = ~a
        elif base == "bfe":
            c = self.val(ops[3])
            x = u32(a) if typ == "u32" else s32(a)
            r = (x >> b) & ((np.int64(1) << c) - 1)
            if typ == "s32":
                sign = (r >> (c - 1)) & 1
                r = np.where(sign == 1, r - (np.int64(1) << c), r)
        elif base == "div":
            bb = np.where(b == 0, 1, b)
            if typ == "s32":
                r = np.trunc(s32(a) / s32(bb)).astype(np.int64)
            elif typ == "s64":
                r = np.trunc(a / bb).astype(np.int64)
            else:
                r = a // bb
        elif base == "rem":
            bb = np.where(b == 0, 1, b)
            r = np.fmod(s32(a) if typ == "s32" else a, s32(bb) if typ == "s32" else bb)
        elif base == "min":
            r = np.minimum(a, b)
        elif base == "max":
            r = np.maximum(a, b)
        elif base in ("ex2", "sqrt", "rcp", "lg2", "fma", "abs"):
            r = np.zeros(self.N, np.int64)
        else:
            raise NotImplementedError(raw)
        self.assign(ops[0], norm(r), act)
