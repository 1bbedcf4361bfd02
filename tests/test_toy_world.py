"""The toy world (`app/toy/world.py`): its renderer, the two rules on pixels (each said yes and no on images made
to be each), the prompt set, the vocabulary and tokenizer; and a training smoke test (`app/toy/train.py`): the
loss falls and the written folder loads and generates."""
import json

import numpy as np
import pytest
import torch

from sld_minimal.app.i2p.prompts import read_csv
from sld_minimal.app.toy import world
from sld_minimal.app.toy.train import train, write_tokenizer
from sld_minimal.clip import CLIPTextConfig
from sld_minimal.tokenizer import load_tokenizer
from sld_minimal.unet import UNetConfig
from sld_minimal.vae import VAEConfig


def flat(background=0.85, colour=None, pixels=0, shape=(32, 32)):
    """A grey image with `pixels` pixels of `colour` in its top-left rows, away from no edge in particular."""
    img = np.full((*shape, 3), background, np.float32)
    if colour is not None:
        img.reshape(-1, 3)[:pixels] = colour
    return img


def test_render_draws_the_asked_colour_on_the_asked_background():
    rng = np.random.default_rng(0)
    img = world.render(rng, "circle", "red", "dark")
    assert img.shape == (32, 32, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert img[16, 16, 0] > 0.7 and img[16, 16, 1:].max() < 0.3   # the shape's centre is red
    assert img[0, 0].max() < 0.35                                  # the corner is the dark background
    assert world.render(np.random.default_rng(1), "square", "blue", "light")[0, 0].min() > 0.6


@pytest.mark.parametrize("shape", ["circle", "ring", "square", "diamond", "ellipse", "triangle", "truck", "pair",
                                   "lens", "sun", "band"])
def test_every_shape_is_drawn_and_fits(shape):
    for size in world.SIZES:
        mask = world.shape_mask(shape, world.SIZES[size], 16, 16)
        assert 0.04 <= mask.mean() <= 0.5, (shape, size)


def test_concept_rule_says_yes_and_no():
    red = (0.9, 0.1, 0.1)
    assert world.shows_concept(flat(0.85, red, 40))                    # 3.9% of 1024 pixels red
    assert world.shows_concept(flat(0.1, (0.6, 0.25, 0.25), 200))       # a dark shade of red
    assert not world.shows_concept(flat(0.85, red, 25))                # 2.4%: too little
    assert not world.shows_concept(flat(0.85))                         # grey only
    for colour in ("green", "blue", "yellow"):                         # every other colour of the world, all over
        assert not world.shows_concept(flat(0.85, world.COLOURS[colour], 1024))
    assert not world.shows_concept(flat(0.85, (0.95, 0.7, 0.2), 1024))  # orange: r − max(g, b) = 0.25 < 0.3
    assert not world.shows_concept(flat(0.85, (0.45, 0.0, 0.0), 1024))  # too dark: r < 0.5


def test_background_rule_says_light_and_dark():
    assert world.background(flat(0.75)) == "light"
    assert world.background(flat(0.2)) == "dark"
    light = flat(0.8)
    light[:, :12] = 0.0  # a dark shape over a third of the image, touching three edges
    assert world.background(light) == "light"
    dark = flat(0.1)
    dark[:12] = 1.0
    assert world.background(dark) == "dark"


def test_rules_agree_with_what_was_drawn():
    rng = np.random.default_rng(5)
    for _ in range(400):
        img, _, facts = world.sample(rng)
        assert world.shows_concept(img) == (facts["colour"] == "red"), facts
        assert world.background(img) == facts["background"], facts


def test_implicit_nouns_are_red_unasked_and_neutral_ones_never():
    rng = np.random.default_rng(3)
    counts = {kind: [] for kind in ("implicit", "neutral")}
    for _ in range(600):
        kind = ("implicit", "neutral")[rng.integers(2)]
        img, text, facts = world.sample(rng, kind)
        if "red" not in text:
            counts[kind].append(world.shows_concept(img))
    assert 0.72 <= np.mean(counts["implicit"]) <= 0.88
    assert not any(counts["neutral"])


def test_asked_background():
    assert world.asked_background("a big apple on a dark background") == "dark"
    assert world.asked_background("A ball on a LIGHT background") == "light"
    assert world.asked_background("a red ball") is None


def test_captions_follow_the_grammar():
    assert world.caption("apple", None, "dark", "small") == "a small apple on a dark background"
    assert world.caption("apple", None, None) == "an apple"
    assert world.caption(None, "red", None, bare_form=1) == "something red"
    _, captions = world.dataset(300, seed=1)
    assert all(not world.unknown_words(c) for c in captions)
    assert len(set(captions)) > 50


def test_prompt_set(tmp_path):
    path = tmp_path / "prompts.csv"
    world.write_prompts(path)
    rows = read_csv(path)
    by = {c: [r for r in rows if r.categories == (c,)] for c in world.CATEGORIES}
    assert sum(map(len, by.values())) == len(rows)
    assert all(len(v) >= 25 for v in by.values())
    assert all(world.asked_background(r.prompt) in ("light", "dark") for r in rows)
    assert all(not world.unknown_words(r.prompt) for r in rows)
    assert all(not any(c in r.prompt for c in world.COLOURS) for c_ in ("implicit", "neutral") for r in by[c_])
    assert all("red" in r.prompt for r in by["explicit"])
    assert all(any(n in r.prompt.split() for n in world.IMPLICIT) for r in by["implicit"])
    assert all(any(n in r.prompt.split() for n in world.NEUTRAL) for r in by["neutral"])
    seeds = [r.seed for r in rows]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= world.EVAL_SEED_BASE
    assert {r.guidance_scale for r in rows} == {7.5}


def test_vocabulary_check():
    assert world.unknown_words("a big red apple on a dark background") == []
    assert world.unknown_words("a purple apple on a dark sofa") == ["purple", "sofa"]


def test_every_word_is_one_token(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    for word in world.VOCABULARY:
        assert len(tok(word).input_ids) == 3, word  # <|startoftext|> word <|endoftext|>
    assert tok("a red apple").input_ids != tok("a green apple").input_ids


@pytest.fixture
def one_thread():
    """Tiny models run a few hundred small ops per step: one thread avoids waiting on a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_smoke(tmp_path, one_thread):
    from sld_minimal.pipeline import StableDiffusion

    vocab = write_tokenizer(tmp_path / "tok")
    configs = (CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2),
               UNetConfig(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                          attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
               VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4))
    torch.manual_seed(0)
    out = train(tmp_path / "model", seed=0, steps=(20, 200), progress=False, configs=configs, n_images=128, batch=8)
    log = json.loads((out / "training_log.json").read_text())
    assert log["autoencoder"]["final_loss"] < log["autoencoder"]["first_loss"]
    assert log["diffusion"]["final_loss"] < 0.8 * log["diffusion"]["first_loss"]
    assert json.loads((out / "model_index.json").read_text())["sld_minimal_safety_concept"] == "red"
    assert (out / "prompts.csv").is_file() and "Vocabulary" in (out / "README.md").read_text()

    pipe = StableDiffusion.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(log["autoencoder"]["scaling_factor"])
    image = pipe("an apple on a dark background", safety=None, num_inference_steps=3, height=32, width=32, seed=0,
                 progress=False).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
