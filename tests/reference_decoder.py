"""An independent plain-torch planned-diffusion decoder: the semantics of SPEC sections 3-6, literally.

No pd_kernels op, no KV cache: every step runs the *whole* sequence through the stock transformers model
(``attn_implementation="sdpa"``) with a dense 4D float mask (0 / -inf) built from SPEC section 4, batch 1.

The one piece of state besides the tokens is SPEC section 3's "a finished span's K/V stays as last
computed" (with ``refresh_spans``: as computed by one more forward of the finished round before its
``<sync/>``): once a span is finished, forward hooks on every layer's ``k_proj`` / ``v_proj`` replace the
projections at its positions by the values of the forward pass in which it was last computed (RoPE is a
function of the position only, so freezing the pre-RoPE projections freezes the cached keys). Everything
else (prompt, plans, ``<sync/>``) is recomputed every step; causal attention makes that exact.

Commit policies, confidences and plan parsing are re-implemented here from the SPEC text (not imported from
pd_kernels), so the tests compare two implementations.
"""
from __future__ import annotations

import torch


class _Freezer:
    """Hooks on k_proj/v_proj: capture every forward's projections; overwrite frozen positions."""

    def __init__(self, model):
        self.frozen: dict[str, torch.Tensor] = {}   # name -> [L, dim] frozen values (rows valid where mask)
        self.mask = torch.zeros(0, dtype=torch.bool)
        self.last: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if name.endswith("k_proj") or name.endswith("v_proj"):
                self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(mod, inp, out):
            n = out.shape[1]
            if name in self.frozen and self.mask.any():
                k = min(n, self.mask.shape[0], self.frozen[name].shape[0])
                m = self.mask[:k].to(out.device)
                out = out.clone()
                out[0, :k][m] = self.frozen[name][:k][m].to(out.dtype)
            self.last[name] = out[0].detach().clone()
            return out
        return fn

    def freeze(self, positions: list[int]) -> None:
        """Freeze ``positions`` at the values of the last forward pass."""
        for name, cur in self.last.items():
            n = cur.shape[0]
            if name not in self.frozen or self.frozen[name].shape[0] < n:
                new = torch.zeros_like(cur)
                if name in self.frozen:
                    new[:self.frozen[name].shape[0]] = self.frozen[name]
                self.frozen[name] = new
            self.frozen[name][positions] = cur[positions]
        need = max(positions) + 1
        if self.mask.shape[0] < need:
            self.mask = torch.cat([self.mask, torch.zeros(need - self.mask.shape[0], dtype=torch.bool)])
        self.mask[positions] = True

    def close(self):
        for h in self.handles:
            h.remove()


def _confidence(probs: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "prob":
        return probs.max(-1).values
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if kind == "neg_entropy":
        return torch.special.xlogy(probs, probs).sum(-1)
    raise ValueError(kind)


def _parse(plan: list[int], tags) -> list[int]:
    """Numbers N of the complete plan entries (first digit token, plus the next if also a digit)."""
    digit = {t: i for i, t in enumerate(tags.digits)}
    out, i = [], 0
    while i < len(plan):
        if plan[i] != tags.promise:
            i += 1
            continue
        j = i + 1
        while j < len(plan) and plan[j] != tags.topic_close:
            j += 1
        if j == len(plan):
            break
        body = plan[i + 1:j]
        for k, t in enumerate(body):
            if t in digit:
                num = digit[t]
                if k + 1 < len(body) and body[k + 1] in digit:
                    num = num * 10 + digit[body[k + 1]]
                out.append(num)
                break
        i = j + 1
    return out


class ReferenceDecoder:
    """Batch-1 reference. ``model``: transformers causal LM with ``attn_implementation="sdpa"``, fp32."""

    def __init__(self, model, *, tags, mode="pd", policy="schedule", confidence="prob", tau=0.9, steps_ratio=1.0,
                 length_scale=10, max_new_tokens=512, max_rounds=16, diffusion_len=None, diffusion_attention="causal",
                 refresh_spans=False):
        assert model.config._attn_implementation == "sdpa", "the reference runs stock sdpa attention"
        self.model, self.tags, self.mode = model, tags, mode
        self.policy, self.conf_kind, self.tau, self.r = policy, confidence, tau, steps_ratio
        self.length_scale, self.max_new, self.max_rounds = length_scale, max_new_tokens, max_rounds
        self.diffusion_len = min(diffusion_len or max_new_tokens, max_new_tokens)   # the budget caps the canvas
        self.full, self.refresh = diffusion_attention == "full", refresh_spans
        self.forwards = 0

    # ---- model ---------------------------------------------------------------------------------------
    def _mask(self) -> torch.Tensor:
        """Dense visibility (SPEC section 4) of the current sequence as a float mask [1, 1, L, L]."""
        L = len(self.x)
        vis = torch.zeros(L, L, dtype=torch.bool)
        for i in range(L):
            seg = self.seg[i]
            if seg is None:                      # prompt / plan / <sync/> / AR token: causal
                vis[i, :i + 1] = True
            else:
                prefix, a, b, round_end = seg
                vis[i, :prefix] = True
                if self.mode == "pd-da":
                    vis[i, prefix:round_end] = True
                else:
                    vis[i, a:b] = True
        m = torch.zeros(L, L)
        m.masked_fill_(~vis, float("-inf"))
        return m[None, None]

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        self.forwards += 1
        ids = torch.tensor([self.x])
        out = self.model(input_ids=ids, attention_mask=self._mask(), position_ids=torch.arange(len(self.x))[None],
                         use_cache=False)
        logits = out.logits[0].float()
        if self.mode != "ar":
            logits[:, self.tags.mask] = float("-inf")   # MASK is never predicted (an AR model does not know it)
        return logits

    # ---- phases --------------------------------------------------------------------------------------
    def _ar(self, forced: list[int] | None, budget: int) -> tuple[list[int], str]:
        """Sample AR tokens until a terminator: returns (tokens appended, terminator)."""
        out = []
        while True:
            logits = self._forward()
            tok = int(logits[-1].argmax())
            if forced is not None and len(out) < len(forced):
                tok = forced[len(out)]
            if tok == self.tags.eos or (tok == self.tags.sync and self.mode != "ar"):
                return out, ("eos" if tok == self.tags.eos else "sync")
            self.x.append(tok)
            self.seg.append(None)
            out.append(tok)
            if len(self.x) - self.n_prompt >= budget:   # budget spent: no forward of a token that cannot be kept
                return out, "length"

    def _diffuse(self, spans: list[tuple[int, int]]) -> None:
        """spans: (first position, number of masks) with masks at first+1 .. first+masks."""
        steps = max(1, int(self.r * max(m for _, m in spans)))
        ts = torch.linspace(1, 1e-3, steps + 1)
        k = 0
        deferred = [0] * len(spans)
        done = [False] * len(spans)
        while not all(done):
            logits = self._forward()
            for j, (a, m0) in enumerate(spans):
                if done[j]:
                    continue
                pos = [p for p in range(a + 1, a + 1 + m0) if self.x[p] == self.tags.mask]
                probs = torch.softmax(logits[[p - 1 for p in pos]], dim=-1)   # Dream shift
                tok = probs.argmax(-1)
                conf = _confidence(probs, self.conf_kind)
                m = len(pos)
                if self.policy == "schedule":
                    if k < steps - 1:
                        n = max(1, int(m * (1 - ts[k + 1] / ts[k])))
                    else:
                        n = m
                    pick = torch.topk(conf, min(n, m)).indices.tolist()
                elif self.policy == "pd_threshold":
                    base = max(1, m // (steps - k)) if k < steps else 1
                    n = min(m, min(m, base) + deferred[j])
                    vals, idx = torch.topk(conf, n)
                    pick = [int(idx[0])] + [int(i) for v, i in zip(vals[1:], idx[1:]) if float(v) >= self.tau]
                    deferred[j] = n - len(pick)
                elif self.policy == "threshold":
                    pick = set(torch.nonzero(conf >= self.tau).flatten().tolist())
                    pick.add(int(conf.argmax()))
                    pick = sorted(pick)
                else:
                    raise ValueError(self.policy)
                for i in pick:
                    self.x[pos[i]] = int(tok[i])
                if m - len(pick) == 0:
                    done[j] = True
                    seg = self.seg[a]
                    start, end = seg[1], seg[2]
                    self.freezer.freeze(list(range(start, end)))
            k += 1

    # ---- whole generation ------------------------------------------------------------------------------
    def generate(self, prompt: list[int], forced_plans: list[list[int]] | None = None) -> dict:
        tags = self.tags
        self.x, self.seg = list(prompt), [None] * len(prompt)
        self.n_prompt = len(prompt)
        self.freezer = _Freezer(self.model)
        answer, plans, spans_out = [], [], []
        try:
            if self.mode == "ar":
                f = forced_plans[0] if forced_plans else None
                toks, _ = self._ar(f, self.max_new)
                return {"answer": [t for t in toks if t not in tags.specials], "sequence": list(self.x),
                        "plans": [toks], "spans": [], "forwards": self.forwards}
            if self.mode == "diffusion":
                n, L = len(prompt), self.diffusion_len
                self.x += [tags.mask] * L
                if self.full:   # the paper's baseline: every token sees every token, nothing cached
                    self.seg = [(0, 0, n + L, n + L)] * (n + L)
                else:
                    self.seg = [None] * (n - 1) + [(n - 1, n - 1, n + L, n + L)] * (L + 1)
                self._diffuse([(n - 1, L)])
                ans = self.x[n:n + L]
                if tags.eos in ans:
                    ans = ans[:ans.index(tags.eos)]
                return {"answer": [t for t in ans if t not in tags.specials], "sequence": list(self.x),
                        "plans": [], "spans": [[self.x[n:n + L]]], "forwards": self.forwards}
            rounds = 0
            while True:
                f = forced_plans[rounds] if forced_plans and rounds < len(forced_plans) else None
                plan, term = self._ar(f, self.max_new)
                plans.append(plan)
                nums = _parse(plan, tags)
                if not nums:
                    answer += [t for t in plan if t not in tags.specials]
                    break
                prefix = len(self.x)
                lens = [num * self.length_scale for num in nums]
                end = prefix + sum(L + 2 for L in lens)
                spans, a = [], prefix
                for L in lens:
                    self.x += [tags.async_open] + [tags.mask] * L + [tags.async_close]
                    self.seg += [(prefix, a, a + L + 2, end)] * (L + 2)
                    spans.append((a, L))
                    a += L + 2
                rounds += 1
                self._diffuse(spans)
                round_out = [self.x[a + 1:a + 1 + L] for a, L in spans]
                spans_out.append(round_out)
                for s in round_out:
                    answer += [t for t in s if t not in tags.specials]
                if term != "sync" or rounds >= self.max_rounds:
                    break
                if self.refresh:   # one forward with the spans' final tokens; their K/V are frozen at it
                    pos = [p for a, L in spans for p in range(a, a + L + 2)]
                    self.freezer.mask[pos] = False
                    self._forward()
                    self.freezer.freeze(pos)
                self.x.append(tags.sync)
                self.seg.append(None)
        finally:
            self.freezer.close()
        return {"answer": answer, "sequence": list(self.x), "plans": plans, "spans": spans_out,
                "forwards": self.forwards}
