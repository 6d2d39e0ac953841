"""The decoder on a tensor-parallel model: what it reads from the model's layout, and the checks across ranks.

A model parallelized by transformers (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`` or
``tp_plan="auto"``) or by hand with ``torch.distributed.tensor.parallel.parallelize_module`` in the same layout
holds DTensor weights: attention and MLP column-parallel in (``q/k/v/gate/up_proj``: ``Shard(0)``) and row-parallel
out (``o/down_proj``: ``Shard(1)``, their output all-reduced), so each rank's attention sees its own
``Hq / world`` query and ``Hkv / world`` KV heads. :func:`tensor_parallel` finds that layout (``None`` for a plain
model: the single-process decoder, unchanged) and refuses what the decoder does not run (:class:`TensorParallelError`,
naming the problem): another layout (sequence parallel: norm weights as DTensors; a projection sharded otherwise),
heads not divisible by the world size, fewer KV heads than ranks (replicated KV heads are not implemented), a
non-1-D mesh, DTensors without an initialized process group.

Every rank runs the same decoder loop on the same requests; the decoder sizes its paged cache from the *local* KV
heads. The LM head: a vocabulary-sharded one (``Shard(0)``: transformers' ``colwise``, ``colwise_gather_output``,
``colwise_rep`` or a tied ``embedding_rowwise``) is not called; the decoder computes this rank's logits slice
``hidden @ W_local.T`` (:meth:`TensorParallel.local_logits`: so the plan's gather of the full ``[N, V]`` logits
never happens) and chooses tokens with :func:`~pd_kernels.parallel.token_confidence_vocab_parallel` (one small
``all_gather`` per step), or, with ``Decoder(vocab_parallel=False)``, gathers the slices (:meth:`gather_logits`,
one ``all_gather`` of ``[world, N, ceil(V / world)]``) and runs :func:`pd_kernels.token_confidence` on them.
Both give every rank the same tokens. Any other LM head (replicated) is called as in one process.

**How a diverged rank is noticed.** By construction every rank computes the same token choices: the hidden states
after each row-parallel layer are all-reduced (the same values on every rank), the token choice runs on the same
gathered logits or the same gathered partials, and every host decision (plans, rounds, finished requests) is made
from the step's read of those tokens. What can still differ is the input: each call starts with
:meth:`TensorParallel.agree` on a fixed-size hash of (the Decoder's settings, the config, the prompts, the forced
plans, the seeds): one ``all_gather`` of 8 bytes per rank, raising on every rank with the ranks that differ. With
``PD_KERNELS_DEBUG=1`` every step also gathers a hash of the step's read (tokens and ``masks_left``) and raises
naming the rank whose tokens differ (a host sync per step: debug only). Collectives only ever carry fixed-size
hashes before the ranks are known to agree: gloo hangs, not fails, when ranks disagree on tensor sizes. A rank that
raises before the call's check (an argument only it finds bad) leaves the others waiting in that gather until the
process group's timeout.

Not run yet: NCCL on GPUs, and CUDA graphs (``cuda_graphs=True``) around the vocabulary-parallel collectives
(gloo cannot be captured; the static step is tested without capture on gloo).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import cdiv

__all__ = ["TensorParallel", "TensorParallelError", "tensor_parallel"]

#: transformers tensor-parallel styles the decoder runs (anything else in ``model._tp_plan`` is refused)
SUPPORTED_STYLES = frozenset({"colwise", "rowwise", "colwise_gather_output", "colwise_rep", "embedding_rowwise"})
_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWWISE = ("o_proj", "down_proj")


class TensorParallelError(ValueError):
    """A tensor-parallel model (or a rank's call) the decoder cannot run exactly; the message names the problem."""


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _placements(p) -> tuple:
    return tuple(p.placements)


def _shard_dim(p):
    """The dim of a DTensor sharded on one mesh dim (``None``: replicated), or ``"other"``."""
    from torch.distributed.tensor import Replicate, Shard

    pl = _placements(p)
    if len(pl) != 1:
        return "other"
    if isinstance(pl[0], Replicate):
        return None
    if type(pl[0]) is Shard:
        return pl[0].dim % p.ndim
    return "other"


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel layout of a model, as the decoder uses it.

    ``group``: the TP process group; ``world`` / ``rank``: its size and this process's rank in it; ``mesh``: the 1-D
    TP device mesh; ``vocab_start`` / ``vocab_local``: this rank's slice of the LM head's rows (``vocab_local`` =
    ``vocab_size`` when the head is not sharded); ``head_sharded``: the LM head is sharded by vocabulary;
    ``vocab_size``: the LM head's rows."""
    group: object
    mesh: object
    world: int
    rank: int
    vocab_size: int
    vocab_start: int
    vocab_local: int
    head_sharded: bool

    # ---- logits ----------------------------------------------------------------------------------------------
    def local_logits(self, model, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[N, vocab_local]``: this rank's columns of the LM head's logits on ``hidden[rows]`` (``hidden``
        ``[T, hidden]``, ``rows`` int64 ``[N]``), the model's logit post-processing applied (elementwise)."""
        from ..integrations.transformers import lm_head_postprocess

        head = model.get_output_embeddings()
        w = head.weight.to_local()
        b = getattr(head, "bias", None)
        if b is not None:
            b = b.to_local() if _is_dtensor(b) else b[self.vocab_start:self.vocab_start + self.vocab_local]
        return lm_head_postprocess(model, torch.nn.functional.linear(hidden.index_select(0, rows), w, b))

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` from every rank's ``[N, vocab_local]`` slice (``Shard(0)`` split: ``ceil(V / world)`` columns
        per rank, padded): one ``all_gather``, no host read."""
        N, V, w = local.shape[0], self.vocab_size, self.world
        chunk = cdiv(V, w)
        padded = torch.nn.functional.pad(local, (0, chunk - local.shape[1])).contiguous()
        out = torch.empty(w * N, chunk, dtype=local.dtype, device=local.device)
        _all_gather_into(out, padded, self.group)
        return out.view(w, N, chunk).permute(1, 0, 2).reshape(N, w * chunk)[:, :V]

    # ---- checks across ranks ---------------------------------------------------------------------------------
    def agree(self, what: str, payload, device: torch.device) -> None:
        """Raise :class:`TensorParallelError` on every rank unless every rank passed an equal ``payload`` (compared
        by a 63-bit hash of its ``repr``: one ``all_gather`` of 8 bytes per rank and one host read)."""
        h = int.from_bytes(hashlib.blake2b(repr(payload).encode(), digest_size=8).digest(), "little") >> 1
        mine = torch.tensor([h], dtype=torch.int64, device=device)
        every = torch.empty(self.world, dtype=torch.int64, device=device)
        _all_gather_into(every, mine, self.group)
        got = every.cpu().tolist()
        if len(set(got)) > 1:
            ref = got[0]
            bad = [r for r, x in enumerate(got) if x != ref]
            raise TensorParallelError(
                f"tensor-parallel ranks disagree on {what}: ranks {bad} differ from rank 0 (this is rank {self.rank}); "
                f"every rank must make the same Decoder and pass the same config, prompts, plans and seeds")

    def check_read(self, read: np.ndarray, step: int, device: torch.device) -> None:
        """``PD_KERNELS_DEBUG=1``: raise naming the ranks whose step read (tokens, ``masks_left``) differs."""
        self.agree(f"the tokens read at step {step} (a rank diverged)", np.ascontiguousarray(read).tobytes(), device)


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``out`` = every rank's ``inp``, concatenated on dim 0 (``all_gather_single``, or its older name)."""
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _tp_mesh(model, dtensors: list):
    """The 1-D TP mesh: ``model._device_mesh`` (its ``"tp"`` dim when named), else the DTensor weights' mesh."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None and mesh.ndim > 1:
        names = mesh.mesh_dim_names or ()
        if "tp" not in names:
            raise TensorParallelError(f"the model's device mesh is {mesh.ndim}-D without a 'tp' dim ({names}): "
                                      f"only tensor parallelism on one mesh dim is implemented")
        mesh = mesh["tp"]
    meshes = {id(p.device_mesh): p.device_mesh for _, p in dtensors}
    if mesh is None:
        if len(meshes) != 1:
            raise TensorParallelError(f"the model's DTensor weights live on {len(meshes)} different device meshes: "
                                      f"one tensor-parallel mesh is implemented")
        mesh = next(iter(meshes.values()))
    for name, p in dtensors:
        if p.device_mesh.ndim != 1:
            raise TensorParallelError(f"{name} is a DTensor on a {p.device_mesh.ndim}-D mesh ({p.placements}): only "
                                      f"tensor parallelism on a 1-D mesh is implemented (no FSDP / HSDP / 2-D layouts)")
        if p.device_mesh.size() != mesh.size():
            raise TensorParallelError(f"{name} is sharded over {p.device_mesh.size()} ranks, the TP mesh has "
                                      f"{mesh.size()}")
    return mesh


def _check_layout(model, dtensors: list) -> None:
    """Refuse any tensor-parallel layout other than column-parallel q/k/v/gate/up, row-parallel o/down, a
    vocabulary- or hidden-sharded embedding and a vocabulary-sharded or replicated LM head."""
    plan = getattr(model, "_tp_plan", None) or {}
    other = {k: v for k, v in plan.items() if v not in SUPPORTED_STYLES}
    if other:
        k, v = next(iter(other.items()))
        raise TensorParallelError(f"tensor-parallel style {v!r} on {k!r} (model._tp_plan) is not implemented: the "
                                  f"decoder runs column/row-wise attention and MLP "
                                  f"({', '.join(sorted(SUPPORTED_STYLES))})")
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    special = {id(getattr(head, "weight", None)): "LM head", id(getattr(emb, "weight", None)): "embedding"}
    for name, p in dtensors:
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        d = _shard_dim(p)
        if id(p) in special:
            if d not in (0, 1, None) or (special[id(p)] == "LM head" and d == 1):
                raise TensorParallelError(f"{name} ({special[id(p)]}) is a DTensor with placements {p.placements}: "
                                          f"the LM head must be sharded by vocabulary (Shard(0)) or replicated")
            continue
        want = 0 if leaf in _COLWISE else 1 if leaf in _ROWWISE else "none"
        if want == "none":
            raise TensorParallelError(
                f"{name} is a DTensor with placements {p.placements}: a tensor-parallel layout other than column/"
                f"row-wise attention and MLP (sequence parallel, for example) is not implemented")
        if d != (want if name.endswith("weight") else (0 if want == 0 else None)):
            raise TensorParallelError(
                f"{name} has placements {p.placements}: the decoder runs {leaf} "
                f"{'column' if want == 0 else 'row'}-parallel only (weight Shard({want}))")


def tensor_parallel(model, geo: dict) -> TensorParallel | None:
    """The model's tensor-parallel layout (``None`` when it holds no DTensor weight), checked; ``geo``: its
    :func:`~pd_kernels.integrations.transformers.model_geometry` (global heads)."""
    from ..integrations.transformers import attention_modules

    dtensors = [(n, p) for n, p in model.named_parameters() if _is_dtensor(p)]
    if not dtensors:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError(f"{type(model).__name__} holds DTensor weights ({dtensors[0][0]}, ...) but no "
                                  f"torch.distributed process group is initialized: run every rank under torchrun "
                                  f"(or call torch.distributed.init_process_group) before decoding")
    mesh = _tp_mesh(model, dtensors)
    _check_layout(model, dtensors)
    world, rank = mesh.size(), mesh.get_local_rank()
    hq, hkv, D = geo["num_heads"], geo["num_kv_heads"], geo["head_dim"]
    if hkv < world:
        raise TensorParallelError(f"the model has {hkv} KV heads, fewer than the {world} tensor-parallel ranks: "
                                  f"replicated KV heads are not implemented (use at most {hkv} ranks)")
    if hq % world or hkv % world:
        raise TensorParallelError(f"{hq} attention heads and {hkv} KV heads are not both divisible by the "
                                  f"{world} tensor-parallel ranks")
    for i, m in enumerate(attention_modules(model)):
        for proj, heads in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
            w = getattr(getattr(m, proj, None), "weight", None)
            if w is None:
                continue
            if not _is_dtensor(w):
                raise TensorParallelError(f"layer {i}: {proj} is not tensor-parallel while other weights are: "
                                          f"every attention layer must be sharded by heads")
            if w.to_local().shape[0] != heads // world * D:
                raise TensorParallelError(f"layer {i}: {proj} holds {w.to_local().shape[0]} rows on rank {rank}, "
                                          f"expected {heads // world} heads x {D}: heads split unevenly")
    head_w = getattr(model.get_output_embeddings(), "weight", None)
    V = geo["vocab_size"]
    sharded = head_w is not None and _is_dtensor(head_w) and _shard_dim(head_w) == 0
    start, local = 0, V
    if sharded:
        from .vocab import vocab_shard

        start, local = vocab_shard(V, world, rank)
        if head_w.to_local().shape[0] != local:
            raise TensorParallelError(f"the LM head holds {head_w.to_local().shape[0]} rows on rank {rank}, expected "
                                      f"{local} (a torch.chunk split of {V} rows over {world} ranks)")
    return TensorParallel(mesh.get_group(), mesh, world, rank, V, start, local, sharded)


def local_geometry(geo: dict, tp: TensorParallel | None) -> dict:
    """``geo`` with this rank's attention heads (``num_heads`` / ``num_kv_heads`` divided by the world size)."""
    if tp is None:
        return geo
    return {**geo, "num_heads": geo["num_heads"] // tp.world, "num_kv_heads": geo["num_kv_heads"] // tp.world}


def parallelize(model, mesh=None):
    """Shard a transformers decoder (Qwen2 / Llama module names: ``self_attn.{q,k,v,o}_proj``,
    ``mlp.{gate,up,down}_proj``, ``lm_head``) over the 1-D ``mesh`` (default: every rank of the default group) in
    the layout the decoder runs, with ``torch.distributed.tensor.parallel.parallelize_module``: q/k/v/gate/up
    column-parallel, o/down row-parallel, the LM head by vocabulary (its own forward gathers the logits; the
    decoder uses the local slice). Embeddings and norms stay replicated. Returns the model (changed in place).
    What ``python -m pd_kernels demo`` does under ``torchrun``; a checkpoint can also be loaded sharded directly
    (``from_pretrained(..., tp_plan="auto")``, :func:`~pd_kernels.integrations.dream.load_dream`)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from ..integrations.transformers import attention_modules

    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError("parallelize: no torch.distributed process group is initialized (run under "
                                  "torchrun, or call torch.distributed.init_process_group first)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    names = {n for n, _ in model.named_modules()}
    plan = {"lm_head": ColwiseParallel(output_layouts=Replicate())} if "lm_head" in names else {}
    for i, _ in enumerate(attention_modules(model)):
        base = f"model.layers.{i}."
        for leaf, style in (("self_attn.q_proj", ColwiseParallel), ("self_attn.k_proj", ColwiseParallel),
                            ("self_attn.v_proj", ColwiseParallel), ("self_attn.o_proj", RowwiseParallel),
                            ("mlp.gate_proj", ColwiseParallel), ("mlp.up_proj", ColwiseParallel),
                            ("mlp.down_proj", RowwiseParallel)):
            if base + leaf not in names:
                raise TensorParallelError(f"parallelize: {type(model).__name__} has no module {base + leaf}: only "
                                          f"the Qwen2 / Llama module layout is known here")
            plan[base + leaf] = style()
    return parallelize_module(model, mesh, plan)
