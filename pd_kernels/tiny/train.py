"""Train the tiny planned-diffusion model from scratch on the synthetic task (``python -m pd_kernels train``).

One model learns every decoding format of the package's decoder, chosen by the tag that ends the prompt
(:mod:`pd_kernels.tiny.tokenizer`): ``<ar>`` (answer token by token), ``<pd>`` (plan, then spans by
diffusion; trained with isolated blocks and, for PD-DA, with the blocks of a round seeing each other) and
``<diffusion>`` (the answer as one block of masks). Each training sequence is one example in one format;
the objective is the method's (SPEC section 9, :mod:`pd_kernels.training`): AR next-token loss outside the
blocks, masked-diffusion loss weighted ``1 / t`` inside them.

Deterministic for a seed on a given machine and thread count (data, noise and initialisation are seeded;
``threads`` fixes torch's intra-op parallelism, on which float reductions depend).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from .. import training
from . import task
from .checkpoint import save
from .tokenizer import TinyTokenizer

@dataclass
class TrainConfig:
    """Everything that determines the trained model (saved with the checkpoint)."""
    seed: int = 0
    steps: int = 12000
    batch_size: int = 32
    lr: float = 2.5e-3
    min_lr: float = 5e-5
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hidden_size: int = 160
    num_layers: int = 5
    num_heads: int = 5
    num_kv_heads: int = 5
    intermediate_size: int = 480
    rope_theta: float = 1000.0
    diffusion_len: int = 58
    formats: dict = field(default_factory=lambda: {"ar": 0.3, "pd": 0.35, "pd-da": 0.15, "diffusion": 0.2})
    # curriculum: until ``fraction`` of the steps, only prompts with at most ``letters`` letters (the rest of the
    # generator's stream is skipped); long sequences from the start kept the model on a loss plateau (the
    # copy-by-content heads did not form in 1500 steps), short ones let them form first
    curriculum: tuple = ((0.08, 16), (0.16, 28), (0.25, 40))
    threads: int = 2


def model_config(cfg: TrainConfig, vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=False, use_sliding_window=False)


class Batches:
    """Seeded stream of training batches: examples from :class:`~pd_kernels.tiny.task.TaskGenerator`
    (training split), a format per example, one diffusion time ``t`` per sequence (stratified over the batch:
    ``t = (i + u) / B`` in shuffled order). ``pool`` batches' worth of sequences are drawn at once, sorted by
    length and cut into batches (less padding), which are then served in a shuffled order."""

    def __init__(self, cfg: TrainConfig, tok: TinyTokenizer, pool: int = 8):
        self.cfg, self.tok, self.pool = cfg, tok, pool
        self.gen = task.TaskGenerator(cfg.seed, "train")
        self.rng = random.Random(cfg.seed + 1)
        self.noise = torch.Generator().manual_seed(cfg.seed + 2)
        self.fmts, self.weights = zip(*cfg.formats.items())
        self.ready: list = []
        self.served = 0

    def letter_cap(self) -> int | None:
        """The curriculum's cap on a prompt's letters at the current step (None: no cap)."""
        f = self.served / max(1, self.cfg.steps)
        return next((n for frac, n in self.cfg.curriculum if f < frac), None)

    def _refill(self) -> None:
        B = self.cfg.batch_size
        cap = self.letter_cap()
        seqs = []
        for _ in range(self.pool * B):
            ex = next(self.gen)
            while cap is not None and sum(len(p.items) for p in ex.parts) > cap:
                ex = next(self.gen)
            fmt = self.rng.choices(self.fmts, self.weights)[0]
            ids, start = self.tok.encode_example(ex, fmt, diffusion_len=self.cfg.diffusion_len)
            seqs.append((len(ids), ids, start, fmt))
        seqs.sort(key=lambda s: s[0])
        chunks = [seqs[i:i + B] for i in range(0, len(seqs), B)]
        self.rng.shuffle(chunks)
        self.ready = chunks[::-1]

    def __next__(self) -> dict:
        if not self.ready:
            self._refill()
        chunk = self.ready.pop()
        self.served += 1
        B = len(chunk)
        ts = [(i + self.rng.random()) / B for i in range(B)]
        self.rng.shuffle(ts)
        out = [training.training_example(torch.tensor(ids), self.tok.tags, fmt=fmt, response_start=start,
                                         t=max(t, 1e-3), generator=self.noise)
               for (_, ids, start, fmt), t in zip(chunk, ts)]
        batch = training.collate(out, self.tok.tags.pad)
        batch["fmts"] = [c[3] for c in chunk]
        return batch


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def batch_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Weighted loss of a :func:`pd_kernels.training.collate` batch, and the per-format losses (floats)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                           ignore_index=training.IGNORE, reduction="none").view(batch["labels"].shape)
    per = ce * batch["weights"]
    loss = per.sum() / max(batch["normalizer"], 1.0)
    by_fmt = {}
    with torch.no_grad():  # unweighted mean cross-entropy per target, by format (for the log)
        valid = batch["labels"] != training.IGNORE
        rows, counts = (ce * valid).sum(1), valid.sum(1)
        for f in set(batch["fmts"]):
            idx = [i for i, g in enumerate(batch["fmts"]) if g == f]
            by_fmt[f] = float(rows[idx].sum() / counts[idx].sum().clamp(min=1))
    return loss, by_fmt


def train(cfg: TrainConfig, out_dir: str | None = None, *, progress: bool = True, log_every: int = 50,
          callback=None, callback_every: int = 0) -> dict:
    """Train from scratch; save the checkpoint to ``out_dir`` (if given). Returns ``{"model", "tokenizer",
    "history"}``, the history being ``{"step": [...], "loss": [...], "by_format": {fmt: [...]}, "wall_s"}``.
    ``callback(step, model, history)`` runs every ``callback_every`` steps (model in eval mode, no grad)."""
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = TinyTokenizer()
    mcfg = model_config(cfg, len(tok))
    mcfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(mcfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                            foreach=True)
    batches = Batches(cfg, tok)
    hist = {"step": [], "loss": [], "by_format": {f: [] for f in cfg.formats}}
    acc, acc_fmt, n_acc = 0.0, {f: [0.0, 0] for f in cfg.formats}, 0
    bar = _progress(cfg.steps, progress)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = next(batches)
        loss, by_fmt = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        acc += float(loss.detach())
        n_acc += 1
        for f, v in by_fmt.items():
            acc_fmt[f][0] += v
            acc_fmt[f][1] += 1
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            hist["step"].append(step + 1)
            hist["loss"].append(acc / n_acc)
            for f, (s, n) in acc_fmt.items():
                hist["by_format"][f].append(s / n if n else float("nan"))
            bar.set_postfix_str(f"loss {acc / n_acc:.4f}")
            acc, acc_fmt, n_acc = 0.0, {f: [0.0, 0] for f in cfg.formats}, 0
        bar.update(1)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            model.eval()
            with torch.no_grad():
                callback(step + 1, model, hist)
            model.train()
    bar.close()
    hist["wall_s"] = time.perf_counter() - t0
    model.eval()
    if out_dir is not None:
        save(model, tok, out_dir, diffusion_len=cfg.diffusion_len,
             extra={"train_config": dataclasses.asdict(cfg), "history": hist})
        plot_loss(hist, os.path.join(out_dir, "loss.png"))
    return {"model": model, "tokenizer": tok, "history": hist}


def plot_loss(hist: dict, path: str) -> bool:
    """Loss curve PNG (total and per format); False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(hist["step"], hist["loss"], label="total (weighted)", color="black", lw=2)
    for f, ys in hist["by_format"].items():
        ax.plot(hist["step"], ys, label=f"{f} (mean CE per target)", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
    except ImportError:  # tqdm comes with transformers; a silent counter otherwise
        class _Null:
            def update(self, n): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()
