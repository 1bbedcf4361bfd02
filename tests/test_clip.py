"""The CLIP text encoder (clip.py) against transformers' CLIPTextModel, on the tiny and the small checkpoint."""
import pytest
import torch

from sld_minimal.diffusers_folder import load_component
from sld_minimal.testing import rel_err
from sld_minimal.tokenizer import load_tokenizer

TOL = 1e-5  # fp32 module parity: max|ours − ref| / max|ref|


@pytest.fixture(scope="module", params=["tiny_ckpt", "small_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_clip_matches_transformers(ckpt):
    ref_cls = pytest.importorskip("transformers").CLIPTextModel
    ours, ref = load_component(ckpt, "text_encoder"), ref_cls.from_pretrained(ckpt, subfolder="text_encoder").eval()
    tok = load_tokenizer(ckpt)
    ids = tok(["a photo of the cat", "the king of dogs, in the rain", ""], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).last_hidden_state) <= TOL
