"""The tiny model's synthetic task (ground truth, parsing, splits) and its tokenizer (formats, files)."""
import pytest

from pd_kernels.decoder import parse_plan
from pd_kernels.tiny import task
from pd_kernels.tiny.task import Example, Part, TaskGenerator, apply_op, parse_prompt
from pd_kernels.tiny.tokenizer import TinyTokenizer


def test_operations_hand_written():
    assert apply_op("rev", tuple("ope")) == tuple("epo")
    assert apply_op("sort", tuple("kdaf")) == tuple("adfk")
    with pytest.raises(ValueError, match="unknown operation"):
        apply_op("shift", ("a",))


def test_example_answer_rounds_and_plan_need():
    ex = parse_prompt("rev o p e c b ; sort k d a f g ; then rev")
    assert ex.prompt == "rev o p e c b ; sort k d a f g ; then rev"
    assert ex.part_answers() == [list("bcepo;"), list("adfgk;"), list("kgfda;")]
    assert ex.answer == "b c e p o ; a d f g k ; k g f d a ;".split()
    assert ex.rounds() == [[0, 1], [2]]
    assert ex.planned
    assert not parse_prompt("rev a b").planned and parse_prompt("rev a b c").planned
    assert ex.check("b c e p o ; a d f g k ; k g f d a ;") and not ex.check("b c e p o ;")
    assert ex.check(ex.answer) and not ex.check(ex.answer[::-1])


@pytest.mark.parametrize("text, msg", [
    ("", "empty part"),
    ("rev a b ;", "empty part"),
    ("upper a b", "unknown operation"),
    ("rev a a", "appears twice"),
    ("rev a b c d e ; sort h i j k a", "'a' appears twice"),
    ("rev a B", "not one of the letters a-p"),
    ("rev a q", "not one of the letters a-p"),
    ("then rev", "needs a previous part"),
    ("rev a b c d e ; then rev c", "write 'then OP'"),
    ("rev a b c d e ; then sort ; rev h i j k l", "independent parts come before"),
    ("rev a b c ; rev d e f ; rev g h i", "at most 2 independent parts"),
    ("rev a b c d", "has 4 letters"),
    ("rev a b c d e f", "has 6 letters"),
    ("rev a b c d e ; sort h i", "has 2 letters"),
    ("rev a b c d e ; rev h i j ; then rev ; then sort", "1 to 3 parts"),
    ("rev " + " ".join("abcdefghi"), "1 to 7 letters"),
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
    kinds = TaskGenerator(3).take(2000)
    dep = sum(len(e.rounds()) > 1 for e in kinds) / 2000
    short = sum(not e.planned for e in kinds) / 2000
    assert 0.15 < dep < 0.25 and 0.05 < short < 0.15
    for e in kinds:   # letters distinct across the prompt
        letters = [c for p in e.parts for c in p.items]
        assert len(letters) == len(set(letters))
    for e in kinds[:200]:   # every generated prompt parses back to itself
        assert parse_prompt(e.prompt) == e


def test_tokenizer_roundtrip_and_unknown_word():
    tok = TinyTokenizer()
    ids = tok.encode("rev o p e ; then sort")
    assert tok.decode(ids) == "rev o p e ; then sort"
    with pytest.raises(ValueError, match="'Q'"):
        tok.encode("rev Q")
    assert tok.tags.max_id() < len(tok)
    assert [tok.vocab[d] for d in tok.tags.digits] == list("0123456789")


def test_pd_format_hand_written_and_parsed_by_the_decoder():
    tok = TinyTokenizer()
    ex = parse_prompt("sort k d a f g ; then rev")
    ids, start = tok.encode_example(ex, "pd", diffusion_len=56)
    assert tok.decode(ids) == (
        "sort k d a f g ; then rev <pd> <promise>-<topic> sort 3 </topic> <async> a d f g k ; </async> "
        "<sync/> <promise>-<topic> rev 3 </topic> <async> k g f d a ; </async> <|im_end|>")
    assert tok.vocab[ids[start - 1]] == "<pd>"
    # each round's plan, as the decoder parses it, announces spans that hold the part's answer
    plan1 = ids[start:ids.index(tok.tags.async_open)]
    entries, errors = parse_plan(plan1, tok.tags, length_scale=task.LENGTH_SCALE)
    assert not errors and [e.length for e in entries] == [6]


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
        ids, start = tok.encode_example(ex, "pd", diffusion_len=56)
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
            # planned parts have an odd number of letters: the answer and ';' fill the span exactly
            assert all(e.length == len(answers[i]) for e, i in zip(entries, idx))


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
