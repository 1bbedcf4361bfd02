"""CLIP's tokenizer (tokenizer.py): the packaged BPE file gives CLIP's ids, and a prompt longer than 77 tokens is cut
with a warning that names the dropped words."""
import hashlib
import warnings

import pytest
import torch

from sld_minimal.tokenizer import BPE_FILE, clip_tokenizer, clip_vocab_and_merges, load_tokenizer


def test_packaged_bpe_file_is_clips():
    assert hashlib.sha256(BPE_FILE.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == len(set(vocab)) == 49408 and len(merges) == 48894
    assert vocab[49406:] == ["<|startoftext|>", "<|endoftext|>"] and vocab[:2] == ["!", '"'] and vocab[256] == "!</w>"


def test_packaged_tokenizer_gives_clips_ids():
    """Ids as OpenAI's CLIP gives them (the same ids other CLIP tokenizers' tests pin)."""
    tok = clip_tokenizer()
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok("Hello, world!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert tok("A PHOTO of  a Cat!").input_ids == [49406, 320, 1125, 539, 320, 2368, 256, 49407]


def test_long_prompts_are_truncated_with_a_warning_naming_the_dropped_words(tiny_ckpt):
    from sld_minimal.tokenizer import tokenize

    tok = load_tokenizer(tiny_ckpt)
    prompt = "the cat " * 37 + "the king photo dog"  # one token per word here: 78; 75 fit between start and end
    with pytest.warns(UserWarning, match="this part is dropped: 'king photo dog'"):
        ids = tokenize(tok, [prompt])
    assert ids.shape == (1, 77) and ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tokenize(tok, ["the cat"])[0, 3:], torch.full((74,), tok.pad_token_id))
