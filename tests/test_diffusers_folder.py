"""The published folder layout (diffusers_folder.py): SD 1.4's key contract checked without the weights, what the
loader accepts, and every loader error in one line."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sld_minimal.clip import CLIPTextConfig
from sld_minimal.diffusers_folder import canonical_key, load_component
from sld_minimal.testing.pickles import write_trap
from sld_minimal.unet import UNetConfig
from sld_minimal.vae import VAEConfig
from sld_minimal.weights import MODELS, WeightsError, read_config

DATA = Path(__file__).parent / "data"  # copies of ../shared/sd14 (manifest and published configs)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "sd14"


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


def test_parameter_counts_match_the_model_card(manifest):
    counts = {c: sum(torch.Size(v["shape"]).numel() for k, v in m.items() if not k.endswith("position_ids"))
              for c, m in manifest.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


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


def test_config_override_is_checked_against_the_file(tiny_ckpt):
    cfg = read_config(UNetConfig, Path(tiny_ckpt) / "unet/config.json")
    with pytest.raises(WeightsError, match="has shape"):
        load_component(tiny_ckpt, "unet", config=dataclasses.replace(cfg, cross_attention_dim=48))


def test_a_pickle_is_never_opened_even_beside_safetensors(tiny_ckpt, tmp_path):
    """A real pickle beside the .safetensors (other weights, and code that would run on unpickling) is ignored: the
    module holds the .safetensors file's tensors and nothing was unpickled."""
    folder, marker = copy(tiny_ckpt, tmp_path), tmp_path / "unpickled"
    weights = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    write_trap(folder / "unet/diffusion_pytorch_model.bin", marker, {k: v + 1 for k, v in weights.items()})
    unet = load_component(folder, "unet")  # reads the .safetensors, ignores the .bin
    state = unet.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(v, weights[k]) for k, v in state.items())
    assert not marker.exists()


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

    folder, marker = copy(tiny_ckpt, tmp_path), tmp_path / "unpickled"
    unet_file = folder / "unet/diffusion_pytorch_model.safetensors"
    if case == "no folder":
        folder = tmp_path / "absent"
    elif case == "no component":
        shutil.rmtree(folder / "unet")
    elif case == "no file":
        unet_file.unlink()
    elif case == "pickle only":  # the weights as a real torch.save pickle, whose unpickling would create `marker`
        write_trap(unet_file.with_suffix(".bin"), marker, load_file(unet_file))
        unet_file.unlink()
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
    assert not marker.exists()  # nothing was unpickled
