"""CLIP's tokenizer (tokenizer.py): the packaged BPE file gives CLIP's ids, a prompt longer than 77 tokens is cut
with a warning that names the dropped words, and a tokenizer's files are checked by value (non-empty, and fitting
the text encoder's embedding)."""
import hashlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from sld_minimal.loading import PACKAGED
from sld_minimal.tokenizer import (BPE_FILE, CLIP_VOCAB_SIZE, check_vocab_size, clip_tokenizer, clip_vocab_and_merges,
                                   load_tokenizer, size, tokenize)
from sld_minimal.weights import WeightsError


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


def test_the_default_concept_fits_clips_77_tokens():
    """The paper's concept is 52 tokens with SD 1.4's vocabulary (start and end included): never truncated, and so
    SEGA-as-safety with it matches diffusers' SEGA pipeline, which cuts longer texts before their end token."""
    from sld_minimal.guidance import DEFAULT_CONCEPT

    ids = clip_tokenizer()(DEFAULT_CONCEPT, truncation=False).input_ids
    assert len(ids) == 52 and ids[0] == 49406 and ids[-1] == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning
        tokenize(clip_tokenizer(), [DEFAULT_CONCEPT])


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


def test_tokenizer_files_are_checked_by_value(tiny_ckpt, tmp_path):
    """Empty or malformed vocab.json / merges.txt are refused by name (transformers would load an empty merges list
    and spell every word byte by byte); a merges file without the `#version` line is fine."""
    tok = Path(shutil.copytree(tiny_ckpt / "tokenizer", tmp_path / "tok"))
    vocab, merges = (tok / "vocab.json").read_text(), (tok / "merges.txt").read_text()
    again = "download the model again or pass another --tokenizer"
    for bad in ('{"a": "one"}', '["a"]', '{"a": -1}', '{"a": 1.0}'):
        (tok / "vocab.json").write_text(bad)
        with pytest.raises(WeightsError) as err:
            load_tokenizer(tok)
        assert str(err.value) == f"{tok / 'vocab.json'} must be a non-empty JSON object of token → id (an integer " \
                                 f">= 0); {again}"
    (tok / "vocab.json").write_text(vocab)
    (tok / "merges.txt").write_text("#version: 0.2\n\n  \n")
    with pytest.raises(WeightsError) as err:
        load_tokenizer(tok)
    assert str(err.value) == f"{tok / 'merges.txt'} holds no merges, so every word would be spelt byte by byte; {again}"
    (tok / "merges.txt").write_text(merges.removeprefix("#version: 0.2\n"))
    assert load_tokenizer(tok)("the cat").input_ids == load_tokenizer(tiny_ckpt)("the cat").input_ids


def test_a_vocabulary_must_fit_the_text_encoders_embedding():
    """Ids 0..n−1 need n embedding rows; a smaller trained vocabulary (the toy model's 619 tokens) is fine."""
    assert CLIP_VOCAB_SIZE == 49408 == len(clip_vocab_and_merges()[0])
    toy = load_tokenizer(PACKAGED["toy"])
    assert size(toy) == len(toy) == 619
    check_vocab_size(619, 619, "toy")
    check_vocab_size(531, 619, "toy")
    with pytest.raises(WeightsError) as err:
        check_vocab_size(CLIP_VOCAB_SIZE, 619, "toy")
    assert str(err.value) == ("the tokenizer has 49408 tokens but the text encoder of toy embeds only 619; pass this "
                              "model's tokenizer (tokenizer= / --tokenizer DIR)")


def test_the_truncation_warning_names_the_text_once_per_pipeline(tiny_ckpt):
    """The tiny model's small vocabulary spells the paper's concept in more than 77 tokens: the warning names the
    safety concept (which the caller did not write) once for the pipeline, and the prompt or negative prompt it cut,
    pointing at the caller's line."""
    from sld_minimal.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    long = "the cat " * 40
    kw = dict(seed=0, height=16, width=16, num_inference_steps=8, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pipe("a cat", safety="strong", **kw)
        pipe("a cat", safety="strong", **kw)
        pipe(long, negative_prompt=long + "dog", safety=None, **kw)
    said = [str(x.message).split(";")[0] for x in w]
    assert said == ["the safety concept is longer than 77 tokens", "the negative prompt is longer than 77 tokens",
                    "the prompt is longer than 77 tokens"], said  # (ε_∅'s branch is encoded before ε_p's)
    assert {x.filename for x in w} == {__file__}
