"""pd_kernels.training: the planned-diffusion training mask and labels against hand-written cases, and
against the decoder's own visibility (SpanLayout)."""
import pytest
import torch

from pd_kernels import ControlTags, SeqQueries, SpanLayout
from pd_kernels.training import (IGNORE, ar_labels, attention_mask, block_structure, collate, mask_spans,
                                  training_example)

# one-character names for readable hand-written sequences
TAGS = ControlTags(eos=1, mask=2, async_open=3, async_close=4, promise=5, topic_close=6, sync=7, pad=8,
                   digits=tuple(range(10, 20)))
SYM = {"E": 1, "M": 2, "<": 3, ">": 4, "P": 5, "C": 6, "S": 7, "_": 8, "2": 12, "3": 13}
WORDS = "abcdefghijklmnopqrstuvwxyz"


def ids_of(s: str) -> torch.Tensor:
    return torch.tensor([SYM[c] if c in SYM else 30 + WORDS.index(c) for c in s.split()])


def grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in r] for r in rows])


def show(m: torch.Tensor) -> str:
    return "\n".join("".join("x" if v else "." for v in row) for row in m.tolist())


# prompt "a b", plan of two entries, two blocks, EOS
ONE_ROUND = "a b P t 2 C P u 3 C < c d > < e f g > E"
ONE_ROUND_MASK = [
    # a b P t 2 C P u 3 C < c d > < e f g > E
    "x...................",  # a
    "xx..................",  # b
    "xxx.................",  # P
    "xxxx................",  # t
    "xxxxx...............",  # 2
    "xxxxxx..............",  # C
    "xxxxxxx.............",  # P
    "xxxxxxxx............",  # u
    "xxxxxxxxx...........",  # 3
    "xxxxxxxxxx..........",  # C
    "xxxxxxxxxxxxxx......",  # <   block 0: prefix + itself (all four of its tokens)
    "xxxxxxxxxxxxxx......",  # c
    "xxxxxxxxxxxxxx......",  # d
    "xxxxxxxxxxxxxx......",  # >
    "xxxxxxxxxx....xxxxx.",  # <   block 1: prefix + itself, not block 0
    "xxxxxxxxxx....xxxxx.",  # e
    "xxxxxxxxxx....xxxxx.",  # f
    "xxxxxxxxxx....xxxxx.",  # g
    "xxxxxxxxxx....xxxxx.",  # >
    "xxxxxxxxxx.........x",  # E   outside the blocks, no <sync/> before it: sees no block
]

# two rounds: block 0, <sync/>, a second plan entry and block 1, EOS
TWO_ROUNDS = "a P 2 C < b c > S P 3 C < d e f > E"
TWO_ROUNDS_MASK = [
    # a P 2 C < b c > S P 3 C < d e f > E
    "x.................",  # a
    "xx................",  # P
    "xxx...............",  # 2
    "xxxx..............",  # C
    "xxxxxxxx..........",  # <
    "xxxxxxxx..........",  # b
    "xxxxxxxx..........",  # c
    "xxxxxxxx..........",  # >
    "xxxxxxxxx.........",  # S   sees the block before it
    "xxxxxxxxxx........",  # P
    "xxxxxxxxxxx.......",  # 3
    "xxxxxxxxxxxx......",  # C
    "xxxxxxxxxxxxxxxxx.",  # <   round-2 block: everything before its round, round-1 block included
    "xxxxxxxxxxxxxxxxx.",  # d
    "xxxxxxxxxxxxxxxxx.",  # e
    "xxxxxxxxxxxxxxxxx.",  # f
    "xxxxxxxxxxxxxxxxx.",  # >
    "xxxxxxxxxxxx.....x",  # E   sees round 1's block (a <sync/> lies between), not round 2's
]


def test_one_round_mask_is_hand_written_case():
    m = attention_mask(ids_of(ONE_ROUND), TAGS)
    assert show(m) == show(grid(ONE_ROUND_MASK))


def test_two_rounds_mask_is_hand_written_case():
    m = attention_mask(ids_of(TWO_ROUNDS), TAGS)
    assert show(m) == show(grid(TWO_ROUNDS_MASK))


def test_dense_rounds_blocks_see_each_other():
    m = attention_mask(ids_of(ONE_ROUND), TAGS, dense=True)
    expect = grid(ONE_ROUND_MASK)
    expect[10:19, 10:19] = True   # PD-DA: the two blocks of the round see each other, both ways
    assert show(m) == show(expect)
    # across rounds nothing changes (one block per round)
    assert torch.equal(attention_mask(ids_of(TWO_ROUNDS), TAGS, dense=True), grid(TWO_ROUNDS_MASK))


def test_diffusion_format_mask():
    # prompt "a b c", then the answer block anchored on the prompt's last token
    m = attention_mask(ids_of("a b c d e E"), TAGS, diffusion_start=2)
    assert show(m) == show(grid(["x.....", "xx....", "xxxxxx", "xxxxxx", "xxxxxx", "xxxxxx"]))


def test_ar_labels_skip_blocks():
    lab = ar_labels(ids_of(TWO_ROUNDS), TAGS, response_start=1)
    names = {v: k for k, v in SYM.items()}
    got = [names.get(int(v), "?") if v != IGNORE else "." for v in lab]
    # a->P P->2 2->C, C->S (the round's terminator, skipping the block), S->P P->3 3->C, C->E (skipping block 2)
    assert got == ["P", "2", "C", "S", ".", ".", ".", ".", "P", "3", "C", "E", ".", ".", ".", ".", ".", "."]
    # the prompt gets no target: with a two-token prompt only its last token predicts
    lab2 = ar_labels(ids_of("a b P 2 C < c > E"), TAGS, response_start=2)
    assert lab2.tolist()[:2] == [IGNORE, SYM["P"]]


def test_block_structure_and_rounds():
    block, rnd = block_structure(ids_of(TWO_ROUNDS), TAGS)
    assert block.tolist() == [-1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, 1, 1, 1, -1]
    assert rnd.tolist() == [0] * 8 + [1] * 10


@pytest.mark.parametrize("bad", ["a < b < c > >", "a < b", "a b > c", "a < b S c >"])
def test_malformed_blocks_raise(bad):
    with pytest.raises(ValueError):
        attention_mask(ids_of(bad), TAGS)


def test_mask_spans_all_and_none():
    ids = ids_of(ONE_ROUND)
    noised, lab, w, n = mask_spans(ids, TAGS, 1.0, generator=torch.Generator().manual_seed(0))
    content = [11, 12, 15, 16, 17]
    assert n == 5
    assert [i for i, v in enumerate(noised.tolist()) if v == TAGS.mask] == content
    # Dream shift: position p is predicted from p - 1, tags never masked
    assert [i for i, v in enumerate(lab.tolist()) if v != IGNORE] == [p - 1 for p in content]
    assert lab[[p - 1 for p in content]].tolist() == ids[content].tolist()
    assert torch.all(w[[p - 1 for p in content]] == 1.0) and float(w.sum()) == 5.0
    _, lab_small, w_small, _ = mask_spans(ids, TAGS, 1e-9, generator=torch.Generator().manual_seed(0))
    assert torch.all(lab_small == IGNORE) and float(w_small.sum()) == 0.0
    with pytest.raises(ValueError):
        mask_spans(ids, TAGS, 0.0)


def test_mask_spans_rate_and_weight():
    ids = ids_of("a P 3 C < " + "b " * 400 + "> E")
    g = torch.Generator().manual_seed(1)
    noised, lab, w, n = mask_spans(ids, TAGS, 0.25, generator=g)
    k = int((noised == TAGS.mask).sum())
    assert n == 400 and 70 < k < 130          # Binomial(400, 0.25): mean 100, sd 8.7
    assert torch.allclose(w[lab != IGNORE], torch.tensor(4.0))


def test_training_example_formats():
    ex = training_example(ids_of(ONE_ROUND), TAGS, fmt="pd", response_start=2, t=1.0)
    ids = ids_of(ONE_ROUND)
    # AR targets on the response outside blocks (b predicts the plan's first token, the last plan token
    # predicts E), diffusion targets at p - 1 for the five masked block tokens
    assert [i for i, v in enumerate(ex["labels"].tolist()) if v != IGNORE] == [1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                               10, 11, 14, 15, 16]
    assert ex["labels"][1:9].tolist() == ids[2:10].tolist() and int(ex["labels"][9]) == SYM["E"]
    assert ex["normalizer"] == 9 + 5
    assert ex["input_ids"][[11, 12, 15, 16, 17]].tolist() == [TAGS.mask] * 5
    assert torch.equal(ex["mask"], grid(ONE_ROUND_MASK))
    arf = training_example(ids_of("a b c d E"), TAGS, fmt="ar", response_start=2, t=0.5)
    assert arf["labels"].tolist() == [IGNORE, 32, 33, SYM["E"], IGNORE]
    assert torch.equal(arf["mask"], torch.ones(5, 5, dtype=torch.bool).tril())
    dif = training_example(ids_of("a b c d E E"), TAGS, fmt="diffusion", response_start=2, t=1.0)
    assert [i for i, v in enumerate(dif["labels"].tolist()) if v != IGNORE] == [1, 2, 3, 4]
    assert dif["input_ids"].tolist()[:2] == [30, 31] and dif["normalizer"] == 4
    with pytest.raises(ValueError):
        training_example(ids_of(ONE_ROUND), TAGS, fmt="ar", response_start=2, t=0.5)
    with pytest.raises(ValueError):
        training_example(ids_of(ONE_ROUND), TAGS, fmt="bidirectional", response_start=2, t=0.5)


def _layout_visibility(prefix: int, lens: list[int], mode: str) -> torch.Tensor:
    """What the decoder's SpanLayout lets each span token see (rows: the spans' tokens)."""
    lay = SpanLayout.build([SeqQueries.spans(prefix, lens, [True] * len(lens), mode=mode)], "cpu")
    kv = lay.q_kv[:sum(lens)]
    T = prefix + sum(lens)
    key = torch.arange(T)[None, :]
    a, lo, hi = kv[:, 0:1], kv[:, 1:2], kv[:, 2:3]
    return (key < a) | ((key >= lo) & (key < hi))


@pytest.mark.parametrize("dense", [False, True])
def test_mask_matches_decoder_layout(dense):
    """Training visibility of a round's blocks == the decoder's (SpanLayout) for the same positions."""
    m = attention_mask(ids_of(ONE_ROUND), TAGS, dense=dense)
    ref = _layout_visibility(10, [4, 5], "pd-da" if dense else "pd")
    assert torch.equal(m[10:19, :19], ref)


def test_collate_pads_and_biases():
    a = training_example(ids_of("a b c E"), TAGS, fmt="ar", response_start=1, t=0.5)
    b = training_example(ids_of(TWO_ROUNDS), TAGS, fmt="pd", response_start=1, t=1.0)
    batch = collate([a, b], pad_id=TAGS.pad)
    assert batch["input_ids"].shape == (2, 18) and batch["attention_mask"].shape == (2, 1, 18, 18)
    bias = batch["attention_mask"]
    assert torch.equal(bias[0, 0, :4, :4] == 0, torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.all(bias[0, 0, 4:, 4:].diagonal() == 0)       # padding rows see themselves (no NaN rows)
    assert torch.all(bias[0, 0, :4, 4:] == float("-inf"))       # nobody sees the padding
    assert torch.all(batch["labels"][0, 4:] == IGNORE)
    assert batch["normalizer"] == a["normalizer"] + b["normalizer"]
