"""Schedule arithmetic of the commit policies (SPEC section 5) and the public exports of the unmask ops.

The ops themselves are tested in ``test_token_confidence.py`` and ``test_commit_spans.py``."""
from __future__ import annotations

import torch

import pd_kernels
from pd_kernels.reference.token_confidence import pd_threshold_budget, schedule_count


# ---------------------------------------------------------------------------------------------------
# schedule arithmetic
# ---------------------------------------------------------------------------------------------------
def test_schedule_count_matches_linspace_rule():
    """The integer form equals the PD reference's fp32 linspace rule except where m (1 - s/t) is within
    float rounding of an integer; includes counts that round down."""
    rounded_down = 0
    for steps in range(1, 70):
        ts = torch.linspace(1, 1e-3, steps + 1)
        for k in range(steps):
            ratio = (1 - ts[k + 1] / ts[k]) if k < steps - 1 else torch.tensor(1.0)
            for m in range(0, 130, 3):
                if m == 0:
                    assert schedule_count(m, k, steps) == 0
                    continue
                prod = m * ratio
                ref = min(m, max(1, int(prod)))
                exact = m * 999 / (1000 * steps - 999 * k) if k < steps - 1 else m
                if abs(exact - round(exact)) < 1e-4:
                    continue
                assert schedule_count(m, k, steps) == ref, (m, k, steps)
                rounded_down += int(prod) != prod
    assert rounded_down > 100
    # r = 1 (m == steps): exactly one token per step, everything at the end
    for L in (1, 2, 10, 37):
        m = L
        for k in range(L):
            n = schedule_count(m, k, L)
            assert n == 1, (L, k, n)
            m -= n
        assert m == 0


def test_pd_threshold_budget():
    assert pd_threshold_budget(10, 0, 5, 0) == 2
    assert pd_threshold_budget(10, 4, 5, 0) == 10        # last original step: everything
    assert pd_threshold_budget(3, 7, 5, 2) == 3          # extra steps: 1 + deferred, capped at m
    assert pd_threshold_budget(9, 0, 10, 0) == 1         # never below 1
    assert pd_threshold_budget(9, 0, 10, 50) == 9        # never above m


def test_public_exports():
    for name in ("token_confidence", "commit_spans", "SpanState"):
        assert hasattr(pd_kernels, name)
    from pd_kernels.reference import commit_spans_ref as a, token_confidence_ref as b  # noqa: F401
