"""Which commit a result comes from, also where the tree has no ``.git`` (the copy sent to a GPU machine).

:func:`commit_id`, in this order:

1. ``$PD_KERNELS_COMMIT``, when set (passed in by whoever starts the run);
2. git, in a checkout: ``HEAD``, with ``-dirty`` when tracked files differ from it;
3. the stamp ``benchmarks/COMMIT``, written where git is (``python benchmarks/provenance.py stamp``, which
   ``bash benchmarks/gpu_check.sh --stamp`` runs) just before the tree is sent: the commit, whether the tree was
   dirty, and the SHA-256 of every tracked file. Reading it hashes those files again, so a stamp older than the
   tree is caught rather than believed: ``<commit>`` (the tree is the commit's), ``<commit>-dirty`` (the tree is
   the commit plus the uncommitted changes present at the stamp), ``<commit>-modified`` (files changed since the
   stamp: the commit is a lower bound only);
4. ``unknown``.

The stamp is git-ignored: send it along (the device tool's ``carry: ["benchmarks/COMMIT"]``). Every JSON writer
of the benchmarks records this (``_harness.environment``, the pytest-benchmark hook in ``benchmarks/conftest.py``),
and ``gpu_check.sh`` exports it as ``PD_KERNELS_COMMIT`` for everything it starts.

    python benchmarks/provenance.py stamp     # where git is: write benchmarks/COMMIT
    python benchmarks/provenance.py           # print the commit id as resolved here
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "benchmarks", "COMMIT")


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"git {' '.join(args)} failed")
    return out.stdout


def _sha256(path: str, root: str = ROOT) -> str | None:
    try:
        with open(os.path.join(root, path), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def git_commit() -> str | None:
    """``HEAD`` (``-dirty`` when tracked files differ from it), or None without git or a repository."""
    try:
        head = _git("rev-parse", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--untracked-files=no").strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return None


def write_stamp(path: str = STAMP) -> str:
    """Write the stamp (commit, dirty flag, a SHA-256 per tracked file present); return the commit id."""
    head = git_commit()
    if head is None:
        raise SystemExit("provenance stamp: needs git and a checkout (run it where the tree comes from)")
    files = [f for f in _git("ls-files", "-z").split("\0") if f and f != os.path.relpath(path, ROOT)]
    lines = [f"commit {head.removesuffix('-dirty')}", f"dirty {int(head.endswith('-dirty'))}"]
    lines += [f"{h}  {f}" for f in sorted(files) if (h := _sha256(f)) is not None]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return head


def stamp_commit(path: str = STAMP, root: str = ROOT) -> str | None:
    """The commit id the stamp at ``path`` vouches for, checked against the files under ``root`` (see the module
    docstring); None without a stamp."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    meta = dict(line.split(" ", 1) for line in lines[:2] if " " in line)
    commit = meta.get("commit")
    if not commit:
        return None
    changed = any(_sha256(f, root) != h for h, f in (line.split("  ", 1) for line in lines[2:] if "  " in line))
    if changed:
        return commit + "-modified"
    return commit + ("-dirty" if meta.get("dirty") == "1" else "")


def commit_id() -> str:
    """``$PD_KERNELS_COMMIT``, else git, else the verified stamp, else ``unknown``."""
    return os.environ.get("PD_KERNELS_COMMIT") or git_commit() or stamp_commit() or "unknown"


def main(argv: list[str]) -> int:
    if argv[:1] == ["stamp"]:
        print(f"wrote {os.path.relpath(STAMP)}: {write_stamp()}")
    elif not argv:
        print(commit_id())
    else:
        print("usage: python benchmarks/provenance.py [stamp]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
