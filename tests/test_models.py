"""The hand-written models: the SD 1.4 key contract, module parity with transformers/diffusers, strict loading."""
import dataclasses
import warnings
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import DATA, SHARED
from sld_minimal.testing import tiny
from sld_minimal.clip import CLIPTextConfig
from sld_minimal.diffusers_folder import canonical_key, load_component
from sld_minimal.testing import rel_err
from sld_minimal.tokenizer import load_tokenizer
from sld_minimal.unet import UNetConfig, timestep_embedding
from sld_minimal.vae import VAEConfig
from sld_minimal.weights import MODELS, WeightsError, read_config

TOL = 1e-5  # fp32 module parity: max|ours − ref| / max|ref|


# ---------------------------------------------------------------- the SD 1.4 key contract (no weights needed)

def test_data_copies_match_shared():
    """tests/data holds copies of ../shared/sd14 so that a clone alone runs the suite; they must not drift."""
    if not SHARED.is_dir():
        pytest.skip("../shared/sd14 is not beside this checkout")
    for ours, theirs in [("sd14_manifest.json", "manifest.json")] + [
            (f"sd14_{c}_config.json", f"{c}_config.json") for c in ("unet", "vae", "text_encoder", "scheduler")]:
        assert json.loads((DATA / ours).read_text()) == json.loads((SHARED / theirs).read_text())


def sd14_configs():
    return {c: read_config(cls, DATA / f"sd14_{c}_config.json") for c, (_, cls) in MODELS.items()}


def test_published_configs_read_as_sd14_defaults():
    cfgs = sd14_configs()
    assert cfgs["unet"] == UNetConfig() and cfgs["vae"] == VAEConfig() and cfgs["text_encoder"] == CLIPTextConfig()
    assert cfgs["vae"].norm_num_groups == 32 and cfgs["vae"].scaling_factor == 0.18215  # absent from the file
    assert cfgs["unet"].attention_head_dim == 8  # = heads in SD 1.x


@pytest.mark.parametrize("component", list(MODELS))
def test_meta_model_has_exactly_the_manifest_keys(component, manifest):
    """Built on `meta` from the published config, each module's state dict has the published keys and shapes,
    after the documented aliases and skips — the whole key contract, in milliseconds."""
    module_cls, _ = MODELS[component]
    with torch.device("meta"):
        model = module_cls(sd14_configs()[component])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    published = {}
    for k, v in manifest[component].items():
        key = canonical_key(component, k)
        if key is not None:
            published[key] = v["shape"]
    assert ours == published
    skipped = {k for k in manifest[component] if canonical_key(component, k) is None}
    expected_skips = {"text_encoder": {"text_model.embeddings.position_ids"}, "unet": set()}.get(component)
    if component == "vae":
        assert skipped and all(k.startswith(("encoder.", "quant_conv.")) for k in skipped)
        assert not any(k.startswith(("encoder.", "quant_conv.")) for k in published)
    else:
        assert skipped == expected_skips


def test_tiny_writer_uses_the_published_layout(manifest):
    """`sld_minimal.testing.tiny` at full size writes exactly the published files' keys, shapes and dtypes."""
    dicts = tiny.published_state_dicts(*tiny.CONFIGS["sd14"], device="meta")
    for component, sd in dicts.items():
        assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in manifest[component].items()}
        dtypes = {k: {torch.float32: "F32", torch.int64: "I64"}[v.dtype] for k, v in sd.items()}
        assert dtypes == {k: v["dtype"] for k, v in manifest[component].items()}


def test_parameter_counts_match_the_model_card(manifest):
    counts = {c: sum(torch.Size(v["shape"]).numel() for k, v in m.items() if not k.endswith("position_ids"))
              for c, m in manifest.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


# ---------------------------------------------------------------- closed-form pieces

def test_timestep_embedding_closed_form():
    """e = [cos(t·ω_k), sin(t·ω_k)], ω_k = 10000^(−k/half)."""
    t = torch.tensor([0, 1, 500])
    e = timestep_embedding(t, 8)
    k = torch.arange(4, dtype=torch.float64)
    omega = 10000.0 ** (-k / 4)
    ref = torch.cat([torch.cos(t[:, None] * omega), torch.sin(t[:, None] * omega)], dim=-1)
    assert torch.allclose(e.double(), ref, atol=1e-4)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


# ---------------------------------------------------------------- parity with the reference implementations

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


@pytest.mark.parametrize("size", [(8, 8), (9, 13)])  # (9, 13): not a multiple of 8: upsamplers resize to the skips
def test_unet_matches_diffusers(ckpt, size):
    diffusers = pytest.importorskip("diffusers")
    ours = load_component(ckpt, "unet")
    ref = diffusers.UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 77, ours.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for t in (981, 1, torch.tensor([500, 20])):
            assert rel_err(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample) <= TOL


def test_vae_decoder_matches_diffusers(ckpt):
    diffusers = pytest.importorskip("diffusers")
    ours = load_component(ckpt, "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(ckpt, subfolder="vae").eval()
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = ours(z)
        ref_img = (ref.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    f = 2 ** (len(ours.config.block_out_channels) - 1)  # 8 for SD 1.4's four levels
    assert img.shape == (2, 3, 8 * f, 6 * f)
    assert rel_err(img, ref_img) <= TOL
    assert torch.equal(z, torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1)))  # input untouched


# ---------------------------------------------------------------- what the loader accepts

def copy(ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "model"))


def outputs(folder):
    torch.manual_seed(0)
    ids, x, ctx = torch.randint(0, 500, (1, 77)), torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        return (load_component(folder, "text_encoder")(ids), load_component(folder, "unet")(x, 10, ctx),
                load_component(folder, "vae")(x))


def test_new_style_names_load_the_same(tiny_ckpt, tmp_path):
    """Saves without `text_model.`, without `position_ids`, and with the new VAE attention names."""
    folder = copy(tiny_ckpt, tmp_path)
    p = folder / "text_encoder/model.safetensors"
    sd = load_file(p)
    save_file({k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}, p)
    p = folder / "vae/diffusion_pytorch_model.safetensors"
    new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    sd = load_file(p)
    save_file({".".join(new.get(part, part) if "attentions" in k else part for part in k.split(".")): v
               for k, v in sd.items()}, p)
    with safe_open(str(p), "pt") as f:
        assert "decoder.mid_block.attentions.0.to_out.0.weight" in f.keys()
    for a, b in zip(outputs(folder), outputs(tiny_ckpt)):
        assert torch.equal(a, b)


def test_fp16_file_and_dtype(tiny_ckpt, tmp_path):
    """`<name>.fp16.safetensors` is used when the fp32 file is absent; the requested dtype decides compute."""
    folder = copy(tiny_ckpt, tmp_path)
    p = folder / "unet/diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(p).items()}, folder / "unet/diffusion_pytorch_model.fp16.safetensors")
    p.unlink()
    unet = load_component(folder, "unet", dtype=torch.float32)
    assert unet.conv_in.weight.dtype == torch.float32
    ref = load_component(tiny_ckpt, "unet")
    assert torch.equal(unet.conv_in.weight, ref.conv_in.weight.half().float())
    assert load_component(folder, "unet", dtype=torch.bfloat16).conv_in.weight.dtype == torch.bfloat16


def test_nothing_is_randomly_initialised(tiny_ckpt):
    """Built on meta and assigned: every parameter is the file's tensor, none left on meta."""
    unet = load_component(tiny_ckpt, "unet")
    assert all(p.device.type == "cpu" for p in unet.parameters())
    sd = load_file(Path(tiny_ckpt) / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, sd[k]) for k, v in unet.state_dict().items())


# ---------------------------------------------------------------- every loader error, one line each

def mutate_unet(folder, fn):
    p = folder / "unet/diffusion_pytorch_model.safetensors"
    save_file(fn(load_file(p)), p)


@pytest.mark.parametrize("case, pattern", [
    ("no folder", r"weights folder .*does not exist.*sld-minimal download"),
    ("no component", r"model/unet is missing; the model folder is incomplete"),
    ("no file", r"has no diffusion_pytorch_model.safetensors .*download it again"),
    ("pickle only", r"diffusion_pytorch_model.bin is a pickle; pickled weights can run code and are never loaded"),
    ("truncated", r"not a readable safetensors file .*truncated"),
    ("not safetensors", r"not a readable safetensors file"),
    ("missing key", r"key 'conv_out.bias' is missing"),
    ("unexpected key", r"unexpected key 'extra.weight'"),
    ("wrong shape", r"key 'conv_in.weight' has shape \[32, 4, 3, 1\], expected \[32, 4, 3, 3\]"),
    ("no config", r"unet/config.json is missing"),
    ("bad config", r"unet/config.json is not valid JSON"),
    ("sd2 config", r"SD 2.x-style UNet; only SD 1.x"),
])
def test_loader_errors(tiny_ckpt, tmp_path, case, pattern):
    from sld_minimal.pipeline import StableDiffusion

    folder = copy(tiny_ckpt, tmp_path)
    unet_file = folder / "unet/diffusion_pytorch_model.safetensors"
    if case == "no folder":
        folder = tmp_path / "absent"
    elif case == "no component":
        shutil.rmtree(folder / "unet")
    elif case == "no file":
        unet_file.unlink()
    elif case == "pickle only":
        unet_file.rename(unet_file.with_suffix(".bin"))
    elif case == "truncated":
        unet_file.write_bytes(unet_file.read_bytes()[: unet_file.stat().st_size // 2])
    elif case == "not safetensors":
        unet_file.write_bytes(b"\x80\x04not a safetensors file at all")
    elif case == "missing key":
        mutate_unet(folder, lambda sd: {k: v for k, v in sd.items() if k != "conv_out.bias"})
    elif case == "unexpected key":
        mutate_unet(folder, lambda sd: sd | {"extra.weight": torch.zeros(1)})
    elif case == "wrong shape":
        mutate_unet(folder, lambda sd: sd | {"conv_in.weight": torch.zeros(32, 4, 3, 1)})
    elif case == "no config":
        (folder / "unet/config.json").unlink()
    elif case == "bad config":
        (folder / "unet/config.json").write_text("{not json")
    elif case == "sd2 config":
        cfg = json.loads((folder / "unet/config.json").read_text())
        (folder / "unet/config.json").write_text(json.dumps(cfg | {"use_linear_projection": True}))
    with pytest.raises(WeightsError, match=pattern) as err:
        StableDiffusion.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_a_pickle_is_never_opened_even_beside_safetensors(tiny_ckpt, tmp_path):
    folder = copy(tiny_ckpt, tmp_path)
    (folder / "unet/diffusion_pytorch_model.bin").write_bytes(b"this would run code if unpickled")
    load_component(folder, "unet")  # reads the .safetensors, ignores the .bin


def test_config_override_is_checked_against_the_file(tiny_ckpt):
    cfg = read_config(UNetConfig, Path(tiny_ckpt) / "unet/config.json")
    with pytest.raises(WeightsError, match="has shape"):
        load_component(tiny_ckpt, "unet", config=dataclasses.replace(cfg, cross_attention_dim=48))


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
