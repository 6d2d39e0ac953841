"""SASS of a cubin: functions, their main loop, instructions per element on its steady-state path.

Used by ``tests/test_triton_compile.py`` (Triton kernels) and ``tests/test_cuda_compile.py`` (``csrc/*.cu``),
both for sm_90 cubins, with the ``cuobjdump`` / ``nvdisasm`` that ship with Triton or the CUDA toolkit.

The measure (issue 14 section 5): a memory-bound row pass can afford about 18 SASS instructions per element
of the logits at 80% of an H200's copy bandwidth (4 warp-instructions per clock per SM). ``loop_cost`` finds
the function's main loop (the innermost loop that holds 16-byte global loads, the logits) and counts the
instructions of one trip along

* ``fast``: the shortest path from the loop head to its back edge that executes a 16-byte load (the steady
  state: no new running maximum, no suppressed id, no element within reach of the sampled key), and
* ``slow``: the longest such path (every rare branch of the body taken once),

each divided by the elements that trip handles (16-byte loads on the path x 16 / element size). ``NOP``s
(alignment padding) are not counted; branches are.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_BRANCH_TARGET = re.compile(r"\b(?:BRA|BRX|JMP|CALL\.REL(?:\.NOINC)?|BSSY|SSY|PBK|BREAK)\b[^;]*?(0x[0-9a-f]+)")


@dataclass
class Insn:
    addr: int
    pred: str      # "" or e.g. "@!P0"
    op: str        # opcode with modifiers, e.g. "LDG.E.128"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Function:
    name: str
    insns: list[Insn] = field(default_factory=list)


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool: Triton's bundled copy, else the CUDA toolkit's, else PATH."""
    cands = []
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except Exception:
        pass
    cands.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which(name)


def sass_text(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (all functions)."""
    exe = tool("cuobjdump")
    if exe is None:
        raise RuntimeError("cuobjdump not found")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([exe, "-sass", f.name], capture_output=True, text=True, check=True, timeout=120).stdout


def parse(text: str) -> dict[str, Function]:
    funcs: dict[str, Function] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            parts = body.split(None, 1)
            cur.insns.append(Insn(int(m.group(1), 16), pred, parts[0], parts[1] if len(parts) > 1 else ""))
    return funcs


def _is_jump(i: Insn) -> bool:
    return i.base in ("BRA", "BRX", "JMP", "JMX")


def _is_end(i: Insn) -> bool:
    return i.base in ("EXIT", "RET", "KILL") and not i.pred


def _blocks(fn: Function):
    """Basic blocks as index ranges, and successor lists (block ids)."""
    ins = fn.insns
    idx = {i.addr: k for k, i in enumerate(ins)}
    leaders = {0}
    for k, i in enumerate(ins):
        if _is_jump(i) or i.base in ("EXIT", "RET"):
            leaders.add(k + 1)
            m = _BRANCH_TARGET.search(i.op + " " + i.args)
            if m and int(m.group(1), 16) in idx:
                leaders.add(idx[int(m.group(1), 16)])
    leaders = sorted(x for x in leaders if x < len(ins))
    starts = {s: b for b, s in enumerate(leaders)}
    blocks = [(s, (leaders[b + 1] if b + 1 < len(leaders) else len(ins))) for b, s in enumerate(leaders)]
    succ = []
    for b, (s, e) in enumerate(blocks):
        last = ins[e - 1]
        out = []
        if _is_jump(last):
            m = _BRANCH_TARGET.search(last.op + " " + last.args)
            if m and int(m.group(1), 16) in idx:
                out.append(starts[idx[int(m.group(1), 16)]])
            if last.pred and e < len(ins):
                out.append(starts[e])
        elif _is_end(last):
            pass
        elif e < len(ins):
            out.append(starts[e])
        succ.append(out)
    return blocks, succ


def _natural_loops(blocks, succ):
    """{header: set of blocks} for every back edge (target at or before the source)."""
    pred = [[] for _ in blocks]
    for b, ss in enumerate(succ):
        for t in ss:
            pred[t].append(b)
    loops = {}
    for b, ss in enumerate(succ):
        for h in ss:
            if h <= b:
                body = {h, b}
                stack = [b]
                while stack:
                    x = stack.pop()
                    for p in pred[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, set()).update(body)
    return loops


def _count(ins, s, e) -> int:
    return sum(1 for i in ins[s:e] if i.base != "NOP")


def _vec_loads(ins, s, e) -> int:
    return sum(1 for i in ins[s:e] if i.base == "LDG" and ".128" in i.op)


@dataclass
class LoopCost:
    fast_insns: int
    fast_elems: int
    slow_insns: int
    slow_elems: int
    loop_insns: int          # every instruction of the loop's blocks (each counted once)

    @property
    def fast(self) -> float:
        return self.fast_insns / self.fast_elems

    @property
    def slow(self) -> float:
        return self.slow_insns / self.slow_elems


def loop_cost(fn: Function, elem_bytes: int) -> LoopCost | None:
    """Instructions per element of the main loop (see the module docstring); None when no loop holds a
    16-byte global load."""
    ins = fn.insns
    blocks, succ = _blocks(fn)
    loops = _natural_loops(blocks, succ)
    cands = [(h, body) for h, body in loops.items() if any(_vec_loads(ins, *blocks[b]) for b in body)]
    if not cands:
        return None
    # innermost: the smallest loop holding a 16-byte load
    h, body = min(cands, key=lambda hb: len(hb[1]))
    latches = {b for b in body for t in succ[b] if t == h}
    # paths head -> latch over forward edges inside the loop (a DAG), tracking whether a 16-byte load ran
    order = sorted(body)
    best_lo: dict[tuple[int, bool], tuple[int, int]] = {}
    best_hi: dict[tuple[int, bool], tuple[int, int]] = {}
    n0, v0 = _count(ins, *blocks[h]), _vec_loads(ins, *blocks[h])
    best_lo[(h, v0 > 0)] = best_hi[(h, v0 > 0)] = (n0, v0)
    for b in order:
        for has in (False, True):
            for table, pick in ((best_lo, min), (best_hi, max)):
                cur = table.get((b, has))
                if cur is None:
                    continue
                for t in succ[b]:
                    if t not in body or t <= b:  # back edges and exits
                        continue
                    n, v = _count(ins, *blocks[t]), _vec_loads(ins, *blocks[t])
                    key = (t, has or v > 0)
                    cand = (cur[0] + n, cur[1] + v)
                    old = table.get(key)
                    table[key] = cand if old is None else pick(old, cand, key=lambda x: x[0])
    lo = [best_lo[(b, True)] for b in latches if (b, True) in best_lo]
    hi = [best_hi[(b, True)] for b in latches if (b, True) in best_hi]
    if not lo:
        return None
    f = min(lo, key=lambda x: x[0])
    s = max(hi, key=lambda x: x[0])
    per_load = 16 // elem_bytes
    total = sum(_count(ins, *blocks[b]) for b in body)
    return LoopCost(f[0], f[1] * per_load, s[0], s[1] * per_load, total)


# ---------------------------------------------------------------------------------------------------------
# ptxas -v logs and the CUDA report (.ci/check_cuda.sh)
# ---------------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_functions(log: str) -> dict[str, dict]:
    """{mangled name: dict(regs, stack, spill_stores, spill_loads)} from an ``nvcc -Xptxas -v`` log."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=None, stack=None, spill_stores=None, spill_loads=None))
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m and cur["stack"] is None:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m and cur["regs"] is None:
            cur["regs"] = int(m.group(1))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    exe = shutil.which("c++filt") or shutil.which("cu++filt")
    if exe is None or not names:
        return {n: n for n in names}
    res = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout.splitlines()
    return dict(zip(names, res)) if len(res) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """``pdk::(anonymous namespace)::row_kernel<__nv_bfloat16, 0, false, true>(...)`` -> ``row_kernel<bf16, 0, ...>``."""
    name = name.replace("pdk::(anonymous namespace)::", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    name = name.replace("<float", "<fp32")
    if name.startswith("void "):
        name = name[5:]
    return name.split("(")[0]


# CUDA kernels allowed to spill (none): reported, and the report fails if one of them stops spilling (so that
# the entry is removed), as an xfail(strict=True) would.
CUDA_KNOWN_SPILLS: dict[str, str] = {}


def cuda_report(obj: str, log_path: str) -> int:
    """Registers / stack / spills of every kernel of an nvcc object, and SASS instructions per element of the
    row pass's main loop; returns 1 if a kernel spills (other than CUDA_KNOWN_SPILLS) or a known one stopped."""
    with open(log_path) as f:
        stats = ptxas_functions(f.read())
    with open(obj, "rb") as f:
        fns = parse(sass_text(f.read()))
    names = demangle(sorted(set(stats) | set(fns)))
    bad = []
    rows = False
    print(f"{'kernel':52s} {'regs':>4} {'stack':>5} {'spill st/ld':>11}   SASS/element: steady path (insns / elements), longest path")
    for mangled in sorted(stats, key=lambda n: _short(names[n])):
        st = stats[mangled]
        short = _short(names[mangled])
        line = (f"{short:52s} {st['regs']!s:>4} {st['stack']!s:>5} "
                f"{st['spill_stores']!s:>5}/{st['spill_loads']!s:<5}")
        fn = fns.get(mangled)
        if fn is not None and short.startswith("row_kernel<"):
            rows = True
            c = loop_cost(fn, 4 if short.startswith("row_kernel<fp32") else 2)
            line += (f"   {c.fast:6.2f} ({c.fast_insns} / {c.fast_elems}), {c.slow:6.2f}" if c else "   no main loop found")
        spills = bool(st["spill_stores"] or st["spill_loads"])
        known = next((k for k in CUDA_KNOWN_SPILLS if short.startswith(k)), None)
        if spills and known is None:
            bad.append(f"{short} spills ({st['spill_stores']} B stored, {st['spill_loads']} B loaded)")
        elif spills:
            line += f"   [known spill: {CUDA_KNOWN_SPILLS[known]}]"
        elif known is not None:
            bad.append(f"{short} no longer spills: remove it from CUDA_KNOWN_SPILLS in tests/_sass.py")
        print(line)
    if rows:
        print("row_kernel<dtype, kind (0 prob, 1 margin, 2 neg_entropy), sampling, top-k/top-p floor>; goals (issue 14):"
              " <= 12 per element for greedy prob and neg_entropy with a suppressed id, <= 20 sampling (~18 is 80% of"
              " an H200's copy bandwidth)")
    for b in bad:
        print("FAIL:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "cuda-report":
        sys.exit(cuda_report(sys.argv[2], sys.argv[3]))
    print("usage: python tests/_sass.py cuda-report OBJECT PTXAS_LOG", file=sys.stderr)
    sys.exit(2)
