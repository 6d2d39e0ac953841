"""Query layouts for :func:`pd_kernels.span_attention` (SPEC section 4: who sees whom), and the attention
*tiling plan*: how the queries of a layout are cut into the kernel's work units.

A forward pass of the decoder packs, over a batch of sequences, the queries it computes: a causal chunk
(prompt prefill, one AR planning token, the ``<sync/>`` token) or the active spans of a diffusion round.
:class:`SeqQueries` describes the queries of one sequence, :class:`SpanLayout` packs them.

Every query row ``t`` sees the keys ``[0, a_t) U [b_t, c_t)`` of its own sequence:

==========================  ==========================  =====================================
query                       ``[0, a)``                   ``[b, c)``
==========================  ==========================  =====================================
causal, position ``i``      ``[0, i + 1)``               empty
span ``j``, ``"pd"``        ``[0, prefix)``              ``[start_j, start_j + len_j)``
span, ``"pd-da"``           ``[0, prefix + sum(lens))``  empty
padding (``pad_to``)        empty                        empty (the output row is 0)
==========================  ==========================  =====================================

**Tiling plan** (this module is its one home; the Triton kernel module reads it). A *segment* is one PD
span, all active spans of a PD-DA round, or a causal chunk of one sequence: its rows share two key ranges
(a causal segment further limits each row to its own position). A *tile* is up to ``T`` consecutive
query rows of one segment; the kernel stacks the ``G = Hq / Hkv`` query heads of a KV head with the tokens
(``T * G`` rows of its query block), so a tile loads each key block once for the whole group. Two tile
classes, chosen **per segment from its own length** (:func:`tile_geometry`):

* *narrow* (decode: one AR token, ``<sync/>``, tiny segments): query block ``max(16, G)`` rows, so
  ``T_n = 16 // G`` tokens (G = 7: 2). Its keys are split into *work units* of at least
  :data:`SPLIT_CHUNK_BLOCKS` x :data:`SPLIT_BLOCK_N` = 256 keys (at most :data:`MAX_SPLITS` units per
  tile; the chunk grows past 8192 keys), so a one-token decode over 4096 keys runs as 16 units per KV head
  instead of one program. Split units write fp32 partials (unnormalised output, running max, sum) into a
  workspace slot; a merge kernel folds a tile's slots in split order (log-sum-exp).
* *wide* (spans, prefill): query block ``max(128, G)`` rows, ``T_w = 128 // G`` tokens (G = 7: 18), one
  unit per tile (no split: these grids are large).

**Batch invariance**: a segment's class, tiles, split points and the kernel variant that runs them
depend only on that segment (its length and key ranges) and the model's ``G`` and head dim, never on the
other sequences of the step, the grid, the GPU or the bucket: a request's output is bitwise the same alone
or in any batch, in a :class:`SpanLayout` or a :class:`StaticSpanLayout`. (Grid sizes and the order in
which programs pick up units do vary; they do not change any unit's arithmetic.)

Modules: :mod:`~pd_kernels.layout.queries` (:class:`SeqQueries`), :mod:`~pd_kernels.layout.plan` (the tiling
plan, its constants and its cache), :mod:`~pd_kernels.layout.layout` (:class:`SpanLayout`),
:mod:`~pd_kernels.layout.static` (:class:`StaticSpanLayout`).

Plans are computed on the host (plain Python over the segments) once per layout and ``G``
(:meth:`SpanLayout.plan`), reach the device with one non-blocking copy, and are shared by the 28 layers of
a step. Everything a layout builds on the host happens in :meth:`SpanLayout.build` /
:meth:`SpanLayout.plan` / :meth:`StaticSpanLayout.update`, never inside a model forward's attention call
(``torch.compile`` traces those calls; see :data:`SpanLayout.segs_host`).

CUDA graphs: a :class:`SpanLayout` has fresh device tensors every step and a unit count (the kernel's grid)
that depends on the step. :class:`StaticSpanLayout` is the bucketed form: fixed-size device buffers for a
bucket (query rows, sequences, segments, keys per sequence) that :meth:`StaticSpanLayout.update` refills
in place (one non-blocking copy from a pinned staging buffer); unit and merge tables have a capacity fixed
per bucket and carry the step's count in a header row that the kernels read, so one captured
``span_attention`` replays correctly for every step of the bucket.
"""
from .layout import SpanLayout
from .plan import (J_ALL, MAX_SPLITS, MERGE_COLS, MERGE_NROWS, MERGE_NSPLITS, MERGE_ROW0, MERGE_SLOT0, NARROW_ROWS,
                   SPLIT_BLOCK_N, SPLIT_CHUNK_BLOCKS, TILE_A, TILE_B, TILE_C, TILE_CAUSAL, TILE_COLS, TILE_NROWS,
                   TILE_ROW0, TILE_SEQ, UNIT_COLS, UNIT_J0, UNIT_J1, UNIT_SLOT, WIDE_ROWS, AttentionPlan, ClassPlan,
                   LayoutPlans, TileGeometry, plan_for, split_units, tile_geometry)
from .queries import SeqQueries
from .static import StaticSpanLayout

__all__ = ["SeqQueries", "SpanLayout", "StaticSpanLayout", "AttentionPlan", "ClassPlan", "LayoutPlans",
           "TileGeometry", "plan_for", "split_units", "tile_geometry", "J_ALL", "MAX_SPLITS", "MERGE_COLS",
           "MERGE_NROWS", "MERGE_NSPLITS", "MERGE_ROW0", "MERGE_SLOT0", "NARROW_ROWS", "SPLIT_BLOCK_N",
           "SPLIT_CHUNK_BLOCKS", "TILE_A", "TILE_B", "TILE_C", "TILE_CAUSAL", "TILE_COLS", "TILE_NROWS", "TILE_ROW0",
           "TILE_SEQ", "UNIT_COLS", "UNIT_J0", "UNIT_J1", "UNIT_SLOT", "WIDE_ROWS"]
