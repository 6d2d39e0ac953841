"""The library side of ``--model PATH``: :func:`pd_kernels.load_checkpoint` (a checkpoint directory of any kind
pd_kernels decodes) and :func:`pd_kernels.tags_from_tokenizer` (the control tags from its tokenizer)."""
import pytest
import torch

from checkpoints import PD_TAG_TEXTS, write_checkpoint
from pd_kernels import Checkpoint, ControlTags, load_checkpoint
from pd_kernels.integrations.checkpoints import checkpoint_kind


@pytest.mark.parametrize("family,kind", [("dream", "dream"), ("llama", "transformers")])
def test_load_checkpoint(tmp_path, family, kind):
    from transformers import Qwen2ForCausalLM

    from pd_kernels import tags_from_tokenizer

    write_checkpoint(tmp_path, family)
    assert checkpoint_kind(str(tmp_path)) == kind
    ck = load_checkpoint(str(tmp_path))
    assert isinstance(ck, Checkpoint) and ck.kind == kind and ck.tiny is None and ck.path == str(tmp_path)
    assert not ck.model.training and next(ck.model.parameters()).dtype == torch.float32
    assert isinstance(ck.model, Qwen2ForCausalLM) == (family == "dream")
    assert tags_from_tokenizer(ck.tokenizer).mask == ck.tokenizer.convert_tokens_to_ids("<|mask|>")


def test_load_checkpoint_of_the_tiny_model():
    from pd_kernels.models import TINY_PD_DIR

    ck = load_checkpoint(TINY_PD_DIR)
    assert ck.kind == "tiny-pd" and ck.tiny is not None and ck.model is ck.tiny.model
    assert isinstance(ck.tokenizer.tags, ControlTags) and ck.tiny.length_scale > 0


@pytest.mark.parametrize("case", ["missing", "file", "no-config"])
def test_checkpoint_kind_of_what_is_not_a_checkpoint(tmp_path, case):
    (tmp_path / "f").write_text("x")
    path, err = {"missing": (tmp_path / "nope", FileNotFoundError), "file": (tmp_path / "f", NotADirectoryError),
                 "no-config": (tmp_path, FileNotFoundError)}[case]
    with pytest.raises(err, match=str(path)):
        load_checkpoint(str(path))


def test_tags_are_read_from_the_tokenizer(tmp_path):
    """``pd_kernels.tags_from_tokenizer`` (what ``--model PATH`` uses): ids by text, overrides by text or id."""
    from transformers import AutoTokenizer

    from pd_kernels import missing_tags, tags_from_tokenizer

    write_checkpoint(tmp_path, "llama", pd_tags=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tags = tags_from_tokenizer(tok)
    ids = [tok.convert_tokens_to_ids(t) for t in PD_TAG_TEXTS]
    assert (tags.eos, tags.mask, tags.async_open, tags.async_close, tags.promise, tags.topic_close, tags.sync,
            tags.pad) == tuple(ids)
    assert tags.digits == tuple(tok.convert_tokens_to_ids(str(d)) for d in range(10)) and not missing_tags(tok)
    # overrides (the CLI's --tag), by text or by id
    tags = tags_from_tokenizer(tok, {"pad": 7, "sync": "<async>", "async_open": "[PAD]"})
    assert tags.pad == 7 and tags.sync == ids[2] and tags.async_open == ids[7]
    with pytest.raises(ValueError, match="no single token 'no such tag'"):
        tags_from_tokenizer(tok, {"mask": "no such tag"})
    with pytest.raises(ValueError, match="distinct"):  # two tags on one id
        tags_from_tokenizer(tok, {"mask": "<async>"})
    with pytest.raises(ValueError, match="unknown control tag 'maskk'"):
        tags_from_tokenizer(tok, {"maskk": 5})


def test_tags_of_a_tokenizer_without_pd_tags(tmp_path):
    """A plain tokenizer: what it lacks is named; AR gets stand-in ids past the tokenizer's vocabulary."""
    from transformers import AutoTokenizer

    from pd_kernels import missing_tags, tags_from_tokenizer

    write_checkpoint(tmp_path, "llama", pd_tags=False, eos="</s>", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    missing = missing_tags(tok)
    assert "eos" not in missing and missing["mask"] == "mask (<|mask|>)"
    with pytest.raises(ValueError, match=r"no planned-diffusion control tag for .*mask \(<\|mask\|>\)"):
        tags_from_tokenizer(tok)
    tags = tags_from_tokenizer(tok, stand_ins=True, vocab_size=400)
    assert tags.eos == tok.eos_token_id
    assert all(len(tok) <= getattr(tags, n) < 400 for n in missing if n != "digits")
