"""Reading ``csrc/`` from the tests: the values the CUDA sources hard-code, to check them against their Python home."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_enum(header: str, name: str) -> dict[str, int]:
    """``{enumerator: value}`` of ``enum <name> : int { kA = 0, kB = 1, ... }`` in ``csrc/<header>`` (every value
    written out)."""
    with open(os.path.join(ROOT, "csrc", header)) as f:
        src = f.read()
    m = re.search(rf"\benum\s+{name}\s*:\s*int\s*\{{([^}}]*)\}}", src)
    assert m, f"enum {name} not found in csrc/{header}"
    out = {}
    for item in filter(None, (s.strip() for s in m.group(1).split(","))):
        k, v = (s.strip() for s in item.split("="))
        out[k] = int(v, 0)
    return out


def enum_of(names) -> dict[str, int]:
    """The enumerators ``csrc/`` declares for the names of a Python home, whose ids are their indices:
    ``("prob", "neg_entropy")`` -> ``{"kProb": 0, "kNegEntropy": 1}``."""
    return {"k" + "".join(w.capitalize() for w in n.split("_")): i for i, n in enumerate(names)}
