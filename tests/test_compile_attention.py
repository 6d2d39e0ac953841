"""torch.compile(fullgraph=True) of a model whose attention layers call span_attention (issue 13).

The tiny Qwen2 model (pd_kernels/models/tiny.py) with the pd_kernels attention runs steps through
``forward_hidden`` + ``StepContext``: a prefill, PD and PD-DA span rounds, decode tokens whose keys are split
into several units. The compiled model (``aot_eager``: the graph is the point, not inductor's codegen; once
with the default inductor backend) must give bitwise the eager model's hidden states, on the torch and
Triton backends, with dynamic and static layouts, and must not recompile for each new layout: after the
first recompile (shapes become dynamic) new step sizes reuse the graph.
"""
import numpy as np
import pytest
import torch

from pd_kernels import PagedKVCache, SeqQueries, SpanLayout, StaticSpanLayout
from pd_kernels.integrations.transformers import StepContext, enable, forward_hidden, model_geometry
from pd_kernels.models import tiny_model

from conftest import DEVICE

PS, L = 8, 300
STEPS = [  # two sequences per step; decode keys up to 299 -> narrow tiles of 2 split units
    [SeqQueries.causal(0, 20), SeqQueries.causal(0, 299)],
    [SeqQueries.spans(20, [5, 9]), SeqQueries.causal(299, 1)],
    [SeqQueries.causal(20, 1), SeqQueries.spans(30, [7, 3, 4], mode="pd-da")],
    [SeqQueries.spans(20, [11, 9, 12], [True, False, True]), SeqQueries.causal(280, 1)],
]


class _Counting:
    """A torch.compile backend that counts graphs and delegates to ``inner``."""

    def __init__(self, inner):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


def _setup():
    eager = enable(tiny_model(seed=2, device=DEVICE))
    compiled = enable(tiny_model(seed=2, device=DEVICE))
    g = model_geometry(eager)
    cache = PagedKVCache(g["num_layers"], g["num_kv_heads"], g["head_dim"], 96, PS, max_seqs=2, dtype=torch.float32,
                         device=DEVICE)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    for s in seqs:
        cache.reserve(s, L)
    ids = torch.randint(0, 200, (2, L), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return eager, compiled, cache, cache.block_tables(seqs), ids, g


def _step(model, cache, bt, ids, layout, backend, bt_attn=None):
    pos = layout.q_pos.long()
    seq = layout.q_seq.long().clamp(min=0)
    slots = torch.where(layout.q_seq >= 0, bt.long()[seq, pos // PS] * PS + pos % PS, -1)
    ctx = StepContext(cache, layout, slots, bt if bt_attn is None else bt_attn, backend)
    return forward_hidden(model, ids[seq, pos], pos, ctx)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_model_matches_eager(backend, static):
    torch._dynamo.reset()
    eager, compiled, cache, bt, ids, g = _setup()
    counting = _Counting("aot_eager")
    compiled.get_decoder().compile(fullgraph=True, backend=counting)
    group = g["num_heads"] // g["num_kv_heads"]
    st = StaticSpanLayout(320, 2, DEVICE, group=group, max_segments=8, max_kv=L) if static else None
    with torch.no_grad():
        for seqs in STEPS:
            layout = st.update(seqs) if static else SpanLayout.build(seqs, DEVICE)
            h_e = _step(eager, cache, bt, ids, layout, backend)
            h_c = _step(compiled, cache, bt, ids, layout, backend)
            assert torch.equal(h_e, h_c), (seqs, (h_e - h_c).abs().max())
            if backend == "triton" and seqs is STEPS[1]:
                assert layout.plan(group).num_slots == 2   # the decode over 300 keys: 2 split units
    # static layouts have fixed tensors: one graph; dynamic ones: a static-shape graph, then one dynamic graph
    assert counting.graphs == (1 if static else 2), counting.graphs


def test_compiled_model_default_backend():
    """Inductor (the default backend) with the Triton backend and dynamic layouts."""
    torch._dynamo.reset()
    eager, compiled, cache, bt, ids, _ = _setup()
    counting = _Counting("inductor")
    compiled.get_decoder().compile(fullgraph=True, backend=counting)
    with torch.no_grad():
        for seqs in STEPS[:3]:
            layout = SpanLayout.build(seqs, DEVICE)
            h_e = _step(eager, cache, bt, ids, layout, "triton")
            h_c = _step(compiled, cache, bt, ids, layout, "triton")
            # inductor fuses the model's other ops (norms, MLP): rounding may differ from eager
            torch.testing.assert_close(h_c, h_e, rtol=1e-4, atol=1e-4)
    assert counting.graphs <= 2


def test_registered_op_checks_the_layout_at_run_time():
    """Under torch.compile the layout checks run inside the op (at run time, from the host tensors): a block
    table too short for the layout still raises, compiled."""
    torch._dynamo.reset()
    _, compiled, cache, bt, ids, _ = _setup()
    compiled.get_decoder().compile(fullgraph=True, backend="aot_eager")
    layout = SpanLayout.build([SeqQueries.causal(0, 12), SeqQueries.causal(0, 3)], DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match=r"past the cache: \(sequence, keys needed\) \[\(0, 12\)\]"):
        _step(compiled, cache, bt, ids, layout, "triton", bt_attn=bt[:, :1].contiguous())
    np.testing.assert_equal(layout.kv_host.numpy(), [12, 3])
