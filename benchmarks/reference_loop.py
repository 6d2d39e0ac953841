"""The peer of the decoder benchmark: planned diffusion run the way the public reference code runs it.

What the reference code (planned-diffusion/planned-diffusion, ``dream/generation_utils_cached_pd.py``,
``dream/pd_utils.py``, ``dream/modeling_dream.py``) does per request, reproduced here from SPEC and
from reading it (facts, not code), on the weights of a transformers Qwen2 / Llama model:

* batch 1 only (the reference asserts it); a batch of requests runs one after another;
* the KV cache holds keys **before** RoPE, one ``[1, L, Hkv*D]`` tensor per layer and K/V: every AR step
  concatenates the new token's K/V to it (a copy of the whole cache), a diffusion round pads it to the
  round's length once, then every step overwrites the forwarded positions in place;
* every forward recomputes cos/sin for positions ``0..L-1`` and applies RoPE to the **whole** cache in every
  layer, repeats K/V to all query heads (``repeat_kv``, materialised), and runs
  ``F.scaled_dot_product_attention`` with a dense additive float mask ``[1, 1, T, L]`` taken from a dense
  boolean ``L x L`` visibility matrix (grown by reallocation every AR step, inverted once per round);
* the LM head runs on every forwarded row (the whole prompt at prefill, every span token in diffusion);
  diffusion logits are scattered into a ``[1, L, V]`` buffer, cloned and shifted by concatenation (the
  Dream shift), the masked rows gathered, a softmax over the full vocabulary taken in the logits' dtype;
* the commit runs as a Python loop over spans with host reads (mask counts, ``int()`` of device scalars,
  the threshold comparisons element by element), the AR loop reads every sampled token on the host.

Where the reference's choices would give other tokens than SPEC's (and so than :mod:`pd_kernels`), this
loop follows SPEC, at the same cost: MASK is never predicted (its logit set to -inf), ties between equal
confidences go to the lower position (a stable sort instead of ``topk``), ``pd_threshold`` never takes more
than the span's masks, the ``threshold`` policy (not in the reference) is applied per span, and the
``schedule`` count uses the reference's float32 ``linspace`` arithmetic (SPEC section 5: it differs from
exact arithmetic at rare (masks, step, steps) triples). Greedy decoding only; ``top_p`` (the reference
scripts pass 0.95) adds its full-vocabulary sort per row when given, and changes confidences as SPEC
section 5 describes. ``diffusion`` mode is the cached single-block form of the same loop (the answer is one
block anchored on the prompt's last token, as in pd_kernels), not Dream's uncached ``diffusion_generate``.

In float32 this gives the same tokens as :class:`pd_kernels.Decoder` (``tests/test_bench_reference_loop.py``);
in bf16 confidences round differently and the two may diverge (measured, reported by the benchmark).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pd_kernels.decoder import DecodeConfig
from pd_kernels.decoder.stats import PHASES


@dataclass
class LoopResult:
    """Output of one request, in the fields of :class:`pd_kernels.decoder.GenerationResult` that the
    benchmark compares, plus the forward passes by phase (``steps``) and the tokens of each forward."""
    answer: list
    sequence: list
    plans: list
    spans: list
    steps: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    forward_tokens: list = field(default_factory=list)
    finish_reason: str = ""

    @property
    def critical_path(self) -> int:
        return sum(self.steps.values())


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class ReferenceLoop:
    """Batch-1 planned-diffusion / AR / diffusion decoding in the reference code's style (see the module
    docstring). Same knobs as :class:`pd_kernels.Decoder` (a :class:`DecodeConfig`), same forced plans.

    Args:
        model: a transformers Qwen2 / Llama causal LM (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
            ``mlp``, the two RMSNorms, ``model.model.{embed_tokens,norm,rotary_emb}``, an LM head). Its own
            attention implementation is never called, so a model :func:`pd_kernels.integrations.transformers.enable`
            'd for the decoder can be shared.
        config: :class:`DecodeConfig` (``temperature`` must be 0).
        top_p: apply the reference scripts' top-p filter (a full-vocabulary sort per row) before the softmax.
    """

    def __init__(self, model, config: DecodeConfig | None = None, *, top_p: float | None = None):
        self.cfg = cfg = config or DecodeConfig()
        if cfg.temperature != 0:
            raise ValueError("ReferenceLoop decodes greedily (temperature 0): sampled tokens would come from "
                             f"another RNG than pd_kernels' and could not be compared; got {cfg.temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        base = getattr(model, "model", None)
        need = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or any(not hasattr(base, a) for a in need) or model.get_output_embeddings() is None:
            raise ValueError(f"ReferenceLoop runs transformers Qwen2 / Llama-style models (model.model with "
                             f"{', '.join(need)} and an LM head); {type(model).__name__} is not one")
        for i, layer in enumerate(base.layers):
            at = getattr(layer, "self_attn", None)
            if at is None or any(not hasattr(at, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                    not all(hasattr(layer, n) for n in ("mlp", "input_layernorm", "post_attention_layernorm")):
                raise ValueError(f"ReferenceLoop: layer {i} of {type(model).__name__} is not a Qwen2 / Llama-style "
                                 f"decoder layer (self_attn.q/k/v/o_proj, mlp, input/post-attention norms)")
            if getattr(at, "sliding_window", None):
                raise ValueError(f"ReferenceLoop: layer {i} uses sliding-window attention, which the reference "
                                 f"loop does not model")
        c = model.config
        self.model, self.base, self.top_p = model, base, top_p
        self.Hq, self.Hkv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.Hq
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cfg.tags.max_id() >= c.vocab_size:
            raise ValueError(f"control-tag ids {cfg.tags} do not fit the model's vocabulary ({c.vocab_size})")

    # ---- the model, the reference's way -------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, q_pos: torch.Tensor, mask_rows: torch.Tensor,
                 replace: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[T, V]`` of the tokens ``ids [1, T]`` at positions ``q_pos [T]``. ``mask_rows``: additive
        float mask ``[1, 1, T, L]``. ``replace``: positions ``[T]`` the new K/V overwrite in the cache (a
        diffusion step), or None (AR: the new K/V are concatenated)."""
        base, T = self.base, ids.shape[1]
        x = base.embed_tokens(ids)
        L = mask_rows.shape[-1]
        cos, sin = base.rotary_emb(x, torch.arange(L, device=self.device)[None])   # every position, every step
        cos_q, sin_q = cos[:, None, q_pos], sin[:, None, q_pos]
        cos, sin = cos[:, None], sin[:, None]
        G = self.Hq // self.Hkv
        for li, layer in enumerate(base.layers):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = at.q_proj(h), at.k_proj(h), at.v_proj(h)
            K, V = self.cache[li]
            if replace is None:
                K, V = torch.cat([K, k], dim=1), torch.cat([V, v], dim=1)   # a copy of the whole cache
            else:
                K[:, replace] = k
                V[:, replace] = v
            self.cache[li] = (K, V)
            q = q.view(1, T, self.Hq, self.D).transpose(1, 2)
            kk = K.view(1, L, self.Hkv, self.D).transpose(1, 2)
            vv = V.view(1, L, self.Hkv, self.D).transpose(1, 2)
            q = q * cos_q + _rotate_half(q) * sin_q
            kk = kk * cos + _rotate_half(kk) * sin                           # RoPE over the whole cache
            kk = kk[:, :, None].expand(1, self.Hkv, G, L, self.D).reshape(1, self.Hq, L, self.D).contiguous()
            vv = vv[:, :, None].expand(1, self.Hkv, G, L, self.D).reshape(1, self.Hq, L, self.D).contiguous()
            o = F.scaled_dot_product_attention(q.contiguous(), kk, vv, attn_mask=mask_rows)
            x = x + at.o_proj(o.transpose(1, 2).reshape(1, T, self.Hq * self.D))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = base.norm(x)
        self.forward_tokens.append(T)
        return self.model.get_output_embeddings()(x)[0]                      # every forwarded row

    def _inverted(self, vis: torch.Tensor) -> torch.Tensor:
        """Bool visibility ``[1, T, L]`` -> additive mask ``[1, 1, T, L]`` in the model dtype."""
        zero = torch.tensor(0.0, device=self.device, dtype=self.dtype)
        neg = torch.tensor(torch.finfo(self.dtype).min, device=self.device, dtype=self.dtype)
        return torch.where(vis, zero, neg).unsqueeze(1)

    @staticmethod
    def _grow(mask: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The reference's ``update_attention_mask``: a new ``[1, L+n, L+n]`` matrix, old block copied, new
        rows see every old column, ``new`` (``[1, n, n]``) among themselves."""
        L, n = mask.shape[-1], new.shape[-1]
        out = torch.zeros(1, L + n, L + n, dtype=torch.bool, device=mask.device)
        out[:, :L, :L] = mask
        out[:, L:, L:] = new
        out[:, L:, :L] = True
        return out

    # ---- phases --------------------------------------------------------------------------------------------
    def _ar(self, forced: list | None, phase0: str) -> tuple[list, str]:
        """AR tokens until a terminator (EOS; ``<sync/>`` unless mode ``ar``) or ``max_new_tokens``: the
        reference's ``_ar_sample``. Returns (tokens appended, terminator)."""
        cfg, tags = self.cfg, self.cfg.tags
        out = []
        phase = phase0
        while True:
            if self.cache is None:   # prefill: the whole sequence, causal, logits for every row
                L = self.x.shape[1]
                self.cache = [(torch.zeros(1, 0, self.Hkv * self.D, device=self.device, dtype=self.dtype),) * 2
                              for _ in self.base.layers]
                logits = self._forward(self.x, torch.arange(L, device=self.device), self._inverted(self.mask),
                                       None)
            else:
                L = self.x.shape[1]
                logits = self._forward(self.x[:, -1:], torch.tensor([L - 1], device=self.device),
                                       self._inverted(self.mask.narrow(-2, L - 1, 1)), None)
            self.res.steps[phase] += 1
            phase = "plan"
            last = logits[-1:].clone()
            if cfg.mode != "ar":   # the decoder suppresses MASK in plans, never in the AR baseline
                last[:, tags.mask] = float("-inf")
            if self.top_p is not None:
                last = self._top_p(last)
            nxt = torch.argmax(last, dim=-1)                                # stays on the device
            if forced is not None and len(out) < len(forced):
                nxt = torch.tensor([forced[len(out)]], device=self.device)
            tok = int(nxt)                                                   # the reference's host read
            if tok == tags.eos or (tok == tags.sync and cfg.mode != "ar"):
                return out, "eos" if tok == tags.eos else "sync"
            self.x = torch.cat([self.x, nxt[None]], dim=1)
            self.mask = self._grow(self.mask, torch.ones(1, 1, 1, dtype=torch.bool, device=self.device))
            out.append(tok)
            if self.x.shape[1] - self.n_prompt >= cfg.max_new_tokens:   # as the decoder: no forward of a token
                return out, "length"                                     # the budget cannot keep

    def _parse(self, plan_ids: torch.Tensor) -> list:
        """Span lengths of the plan entries, token by token with host reads (the reference's
        ``create_pd_inputs``). Only well-formed plans: anything the decoder would drop or clamp raises."""
        tags, cfg = self.cfg.tags, self.cfg
        digit = {t: i for i, t in enumerate(tags.digits)}
        row = plan_ids[0]
        lens, pos, n = [], 0, row.shape[0]
        while pos < n:
            starts = (row[pos:] == tags.promise).nonzero()
            if len(starts) == 0:
                break
            s = pos + starts[0].item()
            ends = (row[s:] == tags.topic_close).nonzero()
            if len(ends) == 0:
                raise ValueError("ReferenceLoop: plan entry without </topic> (the loop handles well-formed plans)")
            e = s + ends[0].item()
            number = None
            for i in range(s + 1, e):
                t = row[i].item()
                if t in digit:
                    number = digit[t]
                    if i + 1 < e and row[i + 1].item() in digit:
                        number = number * 10 + digit[row[i + 1].item()]
                    break
            if not number:
                raise ValueError("ReferenceLoop: plan entry without a number > 0 (the loop handles well-formed plans)")
            lens.append(int(number * cfg.length_scale))
            pos = e + 1
        if any(L > cfg.max_span_len for L in lens) or len(lens) > cfg.max_spans:
            raise ValueError(f"ReferenceLoop: plan {lens} exceeds max_span_len / max_spans (the decoder would "
                             f"clamp or drop; the loop handles plans within the limits)")
        return lens

    def _top_p(self, logits: torch.Tensor) -> torch.Tensor:
        srt, idx = torch.sort(logits, descending=True)
        drop = torch.cumsum(torch.softmax(srt, dim=-1), dim=-1) > self.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, idx, drop), torch.finfo(logits.dtype).min)

    def _confidence(self, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``sample_tokens`` at temperature 0: full-vocabulary softmax in the logits' dtype."""
        mask_logits[:, self.cfg.tags.mask] = float("-inf")
        if self.top_p is not None:
            mask_logits = self._top_p(mask_logits)
        probs = torch.softmax(mask_logits, dim=-1)
        conf, x0 = probs.max(dim=-1)
        kind = self.cfg.confidence
        if kind == "margin":
            srt = torch.sort(probs, dim=-1, descending=True).values
            conf = srt[:, 0] - srt[:, 1]
        elif kind == "neg_entropy":
            conf = torch.special.xlogy(probs, probs).sum(-1)
        return conf, x0

    def _diffuse(self, blocks: list, round_mask: torch.Tensor) -> None:
        """The reference's ``_diff_sample`` over ``blocks`` = [(start, end, masks)] (positions start..end-1,
        masks at start+1..start+masks), ``round_mask``: the sequence's bool visibility ``[1, L, L]``."""
        cfg, tags = self.cfg, self.cfg.tags
        L = self.x.shape[1]
        attn = self._inverted(round_mask)                                  # inverted once per round
        steps = max(1, int(cfg.steps_ratio * max(b[2] for b in blocks)))
        ts = torch.linspace(1, 1e-3, steps + 1, device=self.device)
        placeholder = torch.zeros(1, L, self.model.config.vocab_size, device=self.device, dtype=self.dtype)
        self.cache = [tuple(F.pad(t, (0, 0, 0, L - t.shape[1])) for t in kv) for kv in self.cache]
        completed, deferred = set(), [0] * len(blocks)
        i = 0
        while True:
            mask_index = self.x == tags.mask
            for b, (s, e, _) in enumerate(blocks):
                if mask_index[0, s:e].sum() == 0 and b not in completed:   # host read per block
                    completed.add(b)
            if len(completed) == len(blocks):
                break
            replace = torch.ones(L, dtype=torch.bool)
            replace[:blocks[0][0]] = False
            for b in completed:
                replace[blocks[b][0]:blocks[b][1]] = False
            pos = replace.nonzero().squeeze(1).to(self.device)
            logits = self._forward(self.x[:, pos], pos, attn[:, :, pos, :], pos)
            self.res.steps["diffusion"] += 1
            placeholder[0, pos] = logits
            full = placeholder.clone()
            full = torch.cat([full[:, :1], full[:, :-1]], dim=1)               # Dream shift
            conf, x0 = self._confidence(full[mask_index])
            x_ = torch.zeros_like(self.x) + self.x[0, 0]
            x_[mask_index] = x0
            full_conf = torch.full(self.x.shape, float("-inf"), device=self.device, dtype=conf.dtype)
            full_conf[mask_index] = conf
            ratio = (1 - ts[i + 1] / ts[i]) if (cfg.policy == "schedule" and i < steps - 1) else None
            for b, (s, e, _) in enumerate(blocks):
                bm = mask_index[0, s:e]
                m = int(bm.sum())                                              # host read per block
                if m == 0:
                    continue
                c = full_conf[0, s:e]
                order = torch.sort(c, descending=True, stable=True).indices  # ties: lower position first
                if cfg.policy == "schedule":
                    n = m if ratio is None else min(m, max(1, int(bm.sum() * ratio)))
                    pick = order[:n]
                elif cfg.policy == "pd_threshold":
                    per = m // (steps - i) if i < steps else 0   # then 1 a step until done
                    n = min(m, max(1, per) + deferred[b])
                    deferred[b] = 0
                    keep = [0]
                    for k in range(1, n):                                      # the reference's element loop
                        if c[order[k]] >= cfg.tau:
                            keep.append(k)
                        else:
                            deferred[b] += 1
                    pick = order[keep]
                else:  # threshold: every confident mask, and the span's most confident one
                    sel = (c >= cfg.tau) & bm
                    sel[order[0]] = True
                    pick = sel.nonzero().squeeze(1)
                self.x[0, s + pick] = x_[0, s + pick]
            i += 1

    # ---- one request ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list, forced_plans: list | None = None) -> LoopResult:
        """Decode one prompt (token ids). ``forced_plans``: as one entry of :meth:`pd_kernels.Decoder.generate`'s
        ``forced_plans`` (a list of rounds of forced AR tokens) or None."""
        cfg, tags = self.cfg, self.cfg.tags
        if not prompt:
            raise ValueError("ReferenceLoop.generate needs a prompt with at least one token")
        self.res = res = LoopResult([], [], [], [])
        self.forward_tokens = res.forward_tokens
        self.x = torch.tensor([prompt], dtype=torch.long, device=self.device)
        n = self.n_prompt = len(prompt)
        self.mask = torch.tril(torch.ones(1, n, n, dtype=torch.bool, device=self.device))
        self.cache = None
        if cfg.mode == "ar":
            toks, term = self._ar(forced_plans[0] if forced_plans else None, "prefill")
            res.plans.append(toks)
            res.answer = [t for t in toks if t not in tags.specials]
            res.finish_reason = term
        elif cfg.mode == "diffusion":
            self._diffusion_answer()
        else:
            self._planned(forced_plans)
        res.sequence = self.x[0].tolist()
        return res

    def _diffusion_answer(self) -> None:
        cfg, tags, res = self.cfg, self.cfg.tags, self.res
        n = self.n_prompt
        D = min(cfg.diffusion_len or cfg.budget(n), cfg.budget(n))   # as the decoder: the budget, which also caps it
        self.cache = [(torch.zeros(1, 0, self.Hkv * self.D, device=self.device, dtype=self.dtype),) * 2
                      for _ in self.base.layers]
        if n > 1:   # the prompt but its last token, causal (no token is sampled)
            self._forward(self.x[:, :n - 1], torch.arange(n - 1, device=self.device),
                          self._inverted(self.mask[:, :n - 1, :n - 1]), None)
            res.steps["prefill"] += 1
        self.x = torch.cat([self.x, torch.full((1, D), tags.mask, device=self.device)], dim=1)
        self.mask = self._grow(self.mask[:, :n - 1, :n - 1],
                               torch.ones(1, D + 1, D + 1, dtype=torch.bool, device=self.device))
        self._diffuse([(n - 1, n + D, D)], self.mask)
        ans = self.x[0, n:n + D].tolist()
        res.spans.append([ans])
        # as the decoder: "length" when the budget cut the canvas or it holds no EOS
        res.finish_reason = "eos" if tags.eos in ans and D >= (cfg.diffusion_len or 0) else "length"
        if tags.eos in ans:
            ans = ans[:ans.index(tags.eos)]
        res.answer = [t for t in ans if t not in tags.specials]

    def _planned(self, forced_plans) -> None:
        cfg, tags, res = self.cfg, self.cfg.tags, self.res
        rounds = 0
        phase = "prefill"
        while True:
            f = forced_plans[rounds] if forced_plans and rounds < len(forced_plans) else None
            plan, term = self._ar(f, phase)
            phase = "plan"
            res.plans.append(plan)
            prefix = self.x.shape[1]
            lens = self._parse(self.x[:, prefix - len(plan):]) if plan else []
            if not lens:
                res.answer += [t for t in plan if t not in tags.specials]
                res.finish_reason = "length" if term == "length" else "no_plan"
                return
            new = sum(L + 2 for L in lens)
            if prefix - self.n_prompt + new > cfg.max_new_tokens:
                raise ValueError(f"ReferenceLoop: the round's spans ({lens}) do not fit max_new_tokens="
                                 f"{cfg.max_new_tokens} (the decoder would shorten them)")
            seg, blocks, a = [], [], prefix
            vis = torch.zeros(1, new, new, dtype=torch.bool, device=self.device)
            for L in lens:
                seg += [tags.async_open] + [tags.mask] * L + [tags.async_close]
                vis[0, a - prefix:a - prefix + L + 2, a - prefix:a - prefix + L + 2] = True
                blocks.append((a, a + L + 2, L))
                a += L + 2
            if cfg.mode == "pd-da":
                vis[:] = True
            self.x = torch.cat([self.x, torch.tensor([seg], device=self.device)], dim=1)
            self.mask = self._grow(self.mask, vis)
            rounds += 1
            self._diffuse(blocks, self.mask)
            out = [self.x[0, s + 1:s + 1 + L].tolist() for s, _, L in blocks]
            res.spans.append(out)
            for s in out:
                res.answer += [t for t in s if t not in tags.specials]
            if term != "sync" or rounds >= cfg.max_rounds:
                res.finish_reason = term if term != "sync" else "max_rounds"
                return
            if cfg.max_new_tokens - (self.x.shape[1] - self.n_prompt) < 2:
                res.finish_reason = "length"
                return
            self.x = torch.cat([self.x, torch.tensor([[tags.sync]], device=self.device)], dim=1)
            self.mask = self._grow(self.mask, torch.ones(1, 1, 1, dtype=torch.bool, device=self.device))
