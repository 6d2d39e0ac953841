"""The tiny model's synthetic task (ground truth, parsing, splits) and its tokenizer (formats, files)."""
import pytest

from pd_kernels.decoder import parse_plan
from pd_kernels.tiny import task
from pd_kernels.tiny.task import Example, Part, TaskGenerator, apply_op, parse_prompt
from pd_kernels.tiny.tokenizer import TinyTokenizer


def test_operations_hand_written():
    assert apply_op("rev", tuple("ope")) == tuple("epo")
    assert apply_op("sort", tuple("kdaf")) == tuple("adfk")
    assert apply_op("sort", tuple("BzaA")) == tuple("azAB")     # a-z, then A-Z
    with pytest.raises(ValueError, match="unknown operation"):
        apply_op("shift", ("a",))


P9 = "o p e c b X Y w Q"       # 9 letters
S9 = "k d a f g Z A m n"


def test_example_answer_rounds_and_plan_need():
    ex = parse_prompt(f"rev {P9} ; sort {S9} ; then rev")
    assert ex.prompt == f"rev {P9} ; sort {S9} ; then rev"
    assert ex.part_answers() == ["Q w Y X b c e p o ;".split(), "a d f g k m n A Z ;".split(),
                                 "Z A n m k g f d a ;".split()]
    assert ex.answer == "Q w Y X b c e p o ; a d f g k m n A Z ; Z A n m k g f d a ;".split()
    assert ex.rounds() == [[0, 1], [2]]
    assert ex.planned
    assert not parse_prompt("rev a b c").planned and parse_prompt(f"rev {P9}").planned
    assert ex.check(" ".join(ex.answer)) and not ex.check("Q w Y X b c e p o ;")
    assert ex.check(ex.answer) and not ex.check(ex.answer[::-1])
    four = parse_prompt(" ; ".join(f"{op} " + " ".join(task.LETTERS[13 * i:13 * i + 13])
                                   for i, op in enumerate(("rev", "sort", "rev", "sort"))))
    assert four.rounds() == [[0, 1, 2, 3]] and len(four.answer) == task.max_answer_len() == 56


@pytest.mark.parametrize("text, msg", [
    ("", "empty part"),
    ("rev a b ;", "empty part"),
    ("upper a b", "unknown operation"),
    ("rev a a", "appears twice"),
    (f"rev {P9} ; sort h i j k o l r s t", "'o' appears twice"),
    ("rev a 1", "not one of the letters a-z, A-Z"),
    ("rev a b-", "not one of the letters"),
    ("then rev", "needs a previous part"),
    (f"rev {P9} ; then rev c", "write 'then OP'"),
    (f"rev {P9} ; then sort ; rev {S9}", "at most one 'then OP' part, and it comes last"),
    (f"rev {P9} ; then sort ; then rev", "at most one 'then OP' part"),
    ("rev " + " ; rev ".join(" ".join(task.LETTERS[9 * i:9 * i + 9]) for i in range(5)), "at most 4 independent parts"),
    ("rev a b c d", "has 4 letters"),
    ("rev " + " ".join("abcdefghij"), "has 10 letters"),
    ("rev " + " ".join("abcdefghijklmno"), "has 15 letters"),
    (f"rev {P9} ; sort h i", "has 2 letters"),
    (f"rev {P9} ; sort " + " ".join("hijklrstuvz"), "the parts have 9 and 11 letters"),
    ("rev " + " ; rev ".join(" ".join(task.LETTERS[9 * i:9 * i + 9]) for i in range(5)) + " ; then rev",
     "1 to 5 parts"),
])
def test_parse_prompt_rejects_what_the_model_was_not_trained_on(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_prompt(text)


def test_generator_is_seeded_and_splits_are_disjoint():
    a = [e.prompt for e in TaskGenerator(7).take(300)]
    assert a == [e.prompt for e in TaskGenerator(7).take(300)]
    assert a != [e.prompt for e in TaskGenerator(8).take(300)]
    held = TaskGenerator(7, "eval").take(100)
    assert all(task.is_held_out(e) for e in held)
    assert not any(task.is_held_out(e) for e in TaskGenerator(7).take(1000))
    kinds = TaskGenerator(3).take(4000)
    frac = lambda f: sum(map(f, kinds)) / len(kinds)  # noqa: E731
    assert 0.04 < frac(lambda e: len(e.rounds()) > 1) < 0.10
    assert 0.015 < frac(lambda e: not e.planned) < 0.05
    assert 0.40 < frac(lambda e: len(e.rounds()[0]) == 4 and len(e.rounds()) == 1) < 0.50
    for e in kinds:   # letters distinct across the prompt, one list length per prompt
        letters = [c for p in e.parts for c in p.items]
        assert len(letters) == len(set(letters))
        assert len({len(p.items) for p in e.parts if not p.then}) == 1
    for e in kinds[:200]:   # every generated prompt parses back to itself
        assert parse_prompt(e.prompt) == e


def test_tokenizer_roundtrip_and_unknown_word():
    tok = TinyTokenizer()
    ids = tok.encode("rev o p e ; then sort")
    assert tok.decode(ids) == "rev o p e ; then sort"
    with pytest.raises(ValueError, match="'Q1'"):
        tok.encode("rev Q1")
    assert tok.tags.max_id() < len(tok)
    assert [tok.vocab[d] for d in tok.tags.digits] == list("0123456789")


def test_pd_format_hand_written_and_parsed_by_the_decoder():
    tok = TinyTokenizer()
    ex = parse_prompt(f"sort {S9} ; then rev")
    ids, start = tok.encode_example(ex, "pd", diffusion_len=58)
    assert tok.decode(ids) == (
        f"sort {S9} ; then rev <pd> <promise>-<topic> 5 </topic> <async> a d f g k m n A Z ; </async> "
        "<sync/> <promise>-<topic> 5 </topic> <async> Z A n m k g f d a ; </async> <|im_end|>")
    assert tok.vocab[ids[start - 1]] == "<pd>"
    # each round's plan, as the decoder parses it, announces spans that hold the part's answer
    plan1 = ids[start:ids.index(tok.tags.async_open)]
    entries, errors = parse_plan(plan1, tok.tags, length_scale=task.LENGTH_SCALE)
    assert not errors and [e.length for e in entries] == [10]


def test_ar_and_diffusion_formats():
    tok = TinyTokenizer()
    ex = parse_prompt("rev a b")
    ids, start = tok.encode_example(ex, "ar", diffusion_len=8)
    assert tok.decode(ids) == "rev a b <ar> b a ; <|im_end|>" and start == 4
    ids, start = tok.encode_example(ex, "pd", diffusion_len=8)   # short: answered without a plan
    assert tok.decode(ids) == "rev a b <pd> b a ; <|im_end|>"
    ids, start = tok.encode_example(ex, "diffusion", diffusion_len=6)
    assert tok.decode(ids[start:]) == "b a ; <|im_end|> <|im_end|> <|im_end|>"
    with pytest.raises(ValueError, match="diffusion_len"):
        tok.encode_example(ex, "diffusion", diffusion_len=3)


def test_every_generated_pd_sequence_plans_spans_that_fit():
    tok = TinyTokenizer()
    for ex in TaskGenerator(11).take(300):
        ids, start = tok.encode_example(ex, "pd", diffusion_len=58)
        plans = tok.pd_rounds(ex)
        assert len(plans) == len(ex.rounds())
        if not ex.planned:
            assert tok.tags.promise not in ids and tok.decode(plans[0]).split() == ex.answer
            continue
        answers = ex.part_answers()
        for plan, idx in zip(plans, ex.rounds()):
            entries, errors = parse_plan(plan, tok.tags, length_scale=task.LENGTH_SCALE)
            assert not errors
            assert [e.length for e in entries] == [task.plan_length(len(answers[i])) * task.LENGTH_SCALE
                                                   for i in idx]
            # planned parts have an odd number of letters: the answer and ';' fill the span exactly, and
            # every span of a round has the same length
            assert all(e.length == len(answers[i]) for e, i in zip(entries, idx))
            assert len({e.length for e in entries}) == 1


def test_tokenizer_files_load_in_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = TinyTokenizer()
    tok.save(str(tmp_path))
    assert TinyTokenizer.load(str(tmp_path)).vocab == tok.vocab
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "rev o p e ; then sort <pd> <promise>-<topic> rev 2 </topic> <async> [PAD] </async> <sync/>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    with pytest.raises(FileNotFoundError):
        TinyTokenizer.load(str(tmp_path / "nowhere"))


def test_example_validates_parts():
    with pytest.raises(ValueError):
        Example((Part("rev", ()),))
    assert Example((Part("rev", ("a",)),)).answer == ["a", ";"]
