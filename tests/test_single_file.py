"""Single-file checkpoints (the original CompVis layout): the key map, loading, `convert`, refusals, the CLI. Every
comparison between the two layouts is exact (torch.equal, fp32): both load the same tensors into the same modules,
so any difference is a bug, not rounding."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sld_minimal import single_file, weights
from sld_minimal.app import cli
from sld_minimal.testing import tiny
from sld_minimal.testing.pickles import write_trap
from sld_minimal.diffusers_folder import SCHEDULER_CONFIG, canonical_key, load_component
from sld_minimal.single_file import compvis_name, convert, load_single_file
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.weights import MODELS, WeightsError

DATA = Path(__file__).parent / "data"  # copies of SD 1.4's published files
ORDER = ("text_encoder", "unet", "vae")


@pytest.fixture(scope="module", params=["tiny_ckpt", "small_ckpt"])
def pair(request, tmp_path_factory):
    """(folder, the same model converted to one file)."""
    folder = request.getfixturevalue(request.param)
    return folder, convert(folder, tmp_path_factory.mktemp("single") / f"{folder.name}.safetensors")


_loaded = {}


def folder_models(folder):
    """The three modules loaded from a folder (cached: the reference every test compares with)."""
    if folder not in _loaded:
        _loaded[folder] = [load_component(folder, c) for c in ORDER]
    return _loaded[folder]


def file_models(path, **kw):
    return list(load_single_file(path, **kw)[0].values())


@pytest.fixture(scope="module")
def tiny_file(tiny_ckpt, tmp_path_factory):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("tinyfile") / "tiny.safetensors")


def outputs(parts, seed=0):
    """Each module on the same random input: text encoder (ids), UNet (latents, t, text), VAE decoder (latents)."""
    text, unet, vae = parts
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=g)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return text(ids), unet(x, 500, ctx), vae(x)


def assert_same_models(a, b):
    for m, n in zip(a, b):
        sa, sb = m.state_dict(), n.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for oa, ob in zip(outputs(a), outputs(b)):
        assert torch.equal(oa, ob)  # bit for bit, fp32


def keys_of(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


# ---------------------------------------------------------------- the key map, on the full SD 1.4 manifest (meta)

def test_key_map_is_a_bijection_on_the_sd14_manifest(manifest):
    """Every key the folder loader reads (manifest after aliases and skips) has exactly one CompVis name, and back."""
    counts = {}
    for c in ORDER:
        with torch.device("meta"):
            model = MODELS[c][0](single_file.DEFAULTS[c])
        ours = set(model.state_dict())
        assert ours == {canonical_key(c, k) for k in manifest[c]} - {None}
        names = {k: compvis_name(c, k, single_file.DEFAULTS[c]) for k in ours}
        back = {v: k for k, v in names.items()}
        assert len(back) == len(names) and all(back[names[k]] == k for k in ours)  # injective, so invertible
        assert all(n.startswith(single_file.PREFIX[c]) for n in back)
        counts[c] = len(back)
        if c == "unet":  # ldm's EMA names drop the dots; they must stay distinct too
            assert len({single_file.ema_name(n) for n in back}) == len(back)
    assert counts == {"unet": 686, "vae": 140, "text_encoder": 196}  # VAE: decoder + post_quant_conv


@pytest.mark.parametrize("component, key, name", [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
     "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    ("unet", "conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"),
    ("unet", "time_embedding.linear_2.bias", "model.diffusion_model.time_embed.2.bias"),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight", "model.diffusion_model.input_blocks.4.0.skip_connection.weight"),
    ("unet", "down_blocks.2.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.9.0.op.weight"),
    ("unet", "mid_block.resnets.1.time_emb_proj.weight", "model.diffusion_model.middle_block.2.emb_layers.1.weight"),
    ("unet", "up_blocks.0.upsamplers.0.conv.bias", "model.diffusion_model.output_blocks.2.1.conv.bias"),
    ("unet", "up_blocks.1.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight"),
    ("unet", "up_blocks.3.attentions.2.proj_out.weight", "model.diffusion_model.output_blocks.11.1.proj_out.weight"),
    ("unet", "conv_norm_out.weight", "model.diffusion_model.out.0.weight"),
    ("vae", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight", "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"),
    ("vae", "decoder.mid_block.attentions.0.query.weight", "first_stage_model.decoder.mid.attn_1.q.weight"),
    ("vae", "decoder.mid_block.resnets.0.norm1.bias", "first_stage_model.decoder.mid.block_1.norm1.bias"),
    ("vae", "decoder.up_blocks.0.upsamplers.0.conv.weight", "first_stage_model.decoder.up.3.upsample.conv.weight"),
    ("vae", "decoder.conv_norm_out.weight", "first_stage_model.decoder.norm_out.weight"),
    ("vae", "post_quant_conv.weight", "first_stage_model.post_quant_conv.weight"),
    ("text_encoder", "text_model.final_layer_norm.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
])
def test_known_compvis_names(component, key, name):
    assert compvis_name(component, key, single_file.DEFAULTS[component]) == name
    assert single_file.ema_name("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_key_map_agrees_with_diffusers_single_file_converter(manifest):
    """An independent oracle: diffusers' own CompVis → diffusers converter, given our CompVis names for the whole
    published SD 1.4 (VAE encoder included, shapes as ldm stores them), gives back exactly the manifest."""
    convert_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfgs = single_file.DEFAULTS
    ckpt = {compvis_name(c, k, cfgs[c]): torch.empty(single_file.compvis_shape(c, k, v.shape), device="meta")
            for c, sd in tiny.published_state_dicts(*cfgs.values(), device="meta").items() for k, v in sd.items()}
    assert len(ckpt) == 686 + 248 + 197
    shapes = lambda sd, c: {canonical_key(c, k, skip=False): list(v.shape) for k, v in sd.items()}  # noqa: E731
    unet_cfg = json.loads((DATA / "sd14_unet_config.json").read_text())
    vae_cfg = json.loads((DATA / "sd14_vae_config.json").read_text())
    got = {"unet": shapes(convert_utils.convert_ldm_unet_checkpoint(ckpt, unet_cfg), "unet"),
           "vae": shapes(convert_utils.convert_ldm_vae_checkpoint(ckpt, vae_cfg), "vae"),
           "text_encoder": shapes(convert_utils.convert_ldm_clip_checkpoint(ckpt), "text_encoder")}
    for c in ORDER:
        assert got[c] == {k: v["shape"] for k, v in manifest[c].items()}, c


# ---------------------------------------------------------------- round trips: loads bit for bit like the folder

@pytest.mark.bitexact
def test_single_file_loads_like_the_folder(pair):
    folder, file = pair
    assert_same_models(file_models(file), folder_models(folder))
    assert len(keys_of(file)) == sum(len(load_file(p)) for p in folder.glob("*/*.safetensors"))  # nothing dropped


@pytest.mark.bitexact
def test_file_to_folder_gives_back_the_published_files(pair, tmp_path):
    """folder → file → folder: the same weights files byte for byte, the same configs; and it loads the same."""
    folder, file = pair
    back = convert(file, tmp_path / "back", tokenizer=folder / "tokenizer")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(back) for p in back.rglob("*") if p.is_file())
    for f in files:  # weights, configs, scheduler, model_index, tokenizer
        assert (folder / f).read_bytes() == (back / f).read_bytes(), f
    assert_same_models([load_component(back, c) for c in ORDER], folder_models(folder))


@pytest.mark.bitexact
@pytest.mark.filterwarnings("ignore:prompt is longer")  # the safety concept, in the tiny vocabulary
def test_pipeline_image_from_the_file_equals_the_folder(tiny_ckpt, tiny_file):
    """The whole loop (CFG + SLD with momentum, PNDM, VAE): the same image, bit for bit."""
    kw = dict(num_inference_steps=3, height=32, width=24, seed=0, safety="max", progress=False)
    a = StableDiffusion.from_pretrained(tiny_file, tokenizer=tiny_ckpt)("a photo of the cat", **kw)
    b = StableDiffusion.from_pretrained(tiny_ckpt)("a photo of the cat", **kw)
    assert a.images.shape == (1, 32, 24, 3) and np.array_equal(a.images, b.images)
    assert torch.equal(a.latents, b.latents)


def test_compvis_variants_load_the_same(tiny_ckpt, tiny_file, tmp_path):
    """What files in the wild carry: fp16, text keys without `text_model.`, the training schedule, EMA bookkeeping,
    the VAE encoder, no metadata (so the caller's configs). All load; the weights are the folder's, cast."""
    sd = load_file(tiny_file)
    sd = {k.replace("transformer.text_model.", "transformer."): v.half() if v.is_floating_point() else v
          for k, v in sd.items()}
    extra = {k: torch.zeros(1000) for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                            "log_one_minus_alphas_cumprod", "posterior_mean_coef1")}
    path = tmp_path / "wild.safetensors"
    save_file(sd | extra | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1)}, path)
    with pytest.raises(WeightsError, match=r"key 'cond_stage_model.*' is missing"):  # SD 1.4's configs: 12 layers
        load_single_file(path)
    configs = dict(zip(ORDER, tiny.CONFIGS["tiny"]))
    models, scheduler_config = load_single_file(path, configs=configs)
    assert scheduler_config == SCHEDULER_CONFIG
    for m, r in zip(models.values(), folder_models(tiny_ckpt)):
        assert all(torch.equal(v, r.state_dict()[k].half().float()) for k, v in m.state_dict().items())


def test_ema_weights(tiny_ckpt, tiny_file, tmp_path):
    """`ema=True` reads `model_ema.*` (ldm's dotless names) for the UNet; without it they are ignored."""
    sd = load_file(tiny_file)
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "ema.safetensors"
    save_file(sd | {single_file.ema_name(k): v + 1 for k, v in unet.items()} | {"model_ema.decay": torch.tensor(0.9)},
              path, metadata=safe_open(str(tiny_file), "pt").metadata())
    ref = folder_models(tiny_ckpt)[1].state_dict()
    plain, ema = (load_single_file(path, ema=e)[0]["unet"].state_dict() for e in (False, True))
    assert all(torch.equal(plain[k], ref[k]) and torch.equal(ema[k], ref[k] + 1) for k in ref)
    with pytest.warns(UserWarning, match="EMA UNet weights"):
        convert(path, tmp_path / "folder", tokenizer=tiny_ckpt)  # the EMA copy is not converted: said so
    converted = load_component(convert(path, tmp_path / "ema", ema=True, tokenizer=tiny_ckpt), "unet")
    assert torch.equal(converted.conv_in.weight, ema["conv_in.weight"])


def test_configs_keyword_and_file_metadata(tiny_ckpt, tiny_file):
    """Configs: the caller's win over the file's metadata (a wrong one fails on a shape, naming the key)."""
    import dataclasses

    unet_cfg = dataclasses.replace(tiny.CONFIGS["tiny"][1], cross_attention_dim=48)
    with pytest.raises(WeightsError, match=r"attn2\.to_k\.weight' has shape"):
        StableDiffusion.from_pretrained(tiny_file, tokenizer=tiny_ckpt, configs={"unet": unet_cfg})


# ---------------------------------------------------------------- refusals: one line, naming the file

@pytest.mark.parametrize("case, pattern", [
    ("sd2 keys", r"is an SD 2.x checkpoint \(OpenCLIP\) \(cond_stage_model.model.\* keys\); only SD 1.x"),
    ("sd2 width", r"has 1024-wide cross-attention \(SD 2.x/SDXL\)"),
    ("sdxl", r"is an SDXL checkpoint \(conditioner.embedders.\* keys\)"),
    ("ckpt", r"tiny.ckpt is a pickle; .*never loaded — use the .safetensors release .*tiny.safetensors"),
    ("no vae", r"has no first_stage_model.\* tensors: the vae is missing"),
    ("missing key", r"key 'model.diffusion_model.out.2.bias' is missing"),
    ("unexpected key", r"unexpected key 'model.diffusion_model.extra.weight'"),
    ("stray key", r"unexpected key 'lora_unet_foo'; this is not an SD 1.x single-file checkpoint"),
    ("wrong shape", r"key 'first_stage_model.decoder.mid.attn_1.q.weight' has shape \[64, 64\], expected \[64, 64, 1, 1\]"),
    ("no ema", r"ema=True \(--ema\) needs the EMA copy of the UNet, but \d+ of its \d+ tensors are missing"),
    ("incomplete ema", r"but 1 of its \d+ tensors are missing \(e.g. 'model_ema.diffusion_modelout2bias'\)"),
    ("not safetensors", r"is not a readable safetensors file"),
    ("absent", r"does not exist"),
])
def test_refusals(tiny_ckpt, tiny_file, tmp_path, case, pattern):
    path, ema, marker = tmp_path / "tiny.safetensors", case.endswith("ema"), tmp_path / "unpickled"
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    fn = {"sd2 keys": lambda sd: sd | {"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)},
          "sd2 width": lambda sd: sd | {unet_key: torch.zeros(32, 1024)},
          "sdxl": lambda sd: sd | {"conditioner.embedders.0.transformer.x": torch.zeros(1)},
          "no vae": lambda sd: {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
          "missing key": lambda sd: {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.bias"},
          "unexpected key": lambda sd: sd | {"model.diffusion_model.extra.weight": torch.zeros(1)},
          "stray key": lambda sd: sd | {"lora_unet_foo": torch.zeros(1)},
          "wrong shape": lambda sd: sd | {"first_stage_model.decoder.mid.attn_1.q.weight": torch.zeros(64, 64)},
          "incomplete ema": lambda sd: sd | {single_file.ema_name(k): v.clone() for k, v in sd.items()
                                             if k.startswith("model.diffusion_model.") and not k.endswith("out.2.bias")},
          }.get(case)
    if fn:
        save_file(fn(load_file(tiny_file)), path, metadata=safe_open(str(tiny_file), "pt").metadata())
    elif case == "ckpt":  # the weights as a real torch.save pickle, whose unpickling would create `marker`
        path = write_trap(tmp_path / "tiny.ckpt", marker, load_file(tiny_file))
    elif case == "not safetensors":
        path.write_bytes(b"\x80\x04not a safetensors file")
    elif case != "absent":
        shutil.copy(tiny_file, path)
    with pytest.raises(WeightsError, match=pattern) as err:
        StableDiffusion.from_pretrained(path, tokenizer=tiny_ckpt, ema=ema)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()  # nothing was unpickled


def test_packaged_tokenizer_larger_than_the_embedding_is_a_clear_error(tiny_file):
    with pytest.raises(WeightsError, match=rf"tokenizer has 49408 tokens but the text encoder of .*tiny.safetensors "
                                           rf"embeds only {tiny.VOCAB_SIZE}; pass this model's tokenizer"):
        StableDiffusion.from_pretrained(tiny_file)


# ---------------------------------------------------------------- the CLI

@pytest.mark.bitexact
def test_cli_convert_both_ways_and_never_overwrite(tiny_ckpt, tmp_path, capsys):
    file, folder = tmp_path / "m.safetensors", tmp_path / "m"
    assert cli.main(["convert", str(tiny_ckpt), str(file)]) == 0
    assert cli.main(["convert", str(file), str(folder), "--tokenizer", str(tiny_ckpt)]) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    assert_same_models([load_component(folder, c) for c in ORDER], folder_models(tiny_ckpt))
    before = file.read_bytes()
    for src, dst in ((tiny_ckpt, file), (file, folder)):
        assert cli.main(["convert", str(src), str(dst)]) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{dst} already exists; convert never overwrites" in err
    assert file.read_bytes() == before
    # a failed conversion leaves neither the destination nor its temporary folder
    assert cli.main(["convert", str(tmp_path / "absent"), str(tmp_path / "x.safetensors")]) == cli.EXIT_ERROR
    assert cli.main(["convert", str(file), str(tmp_path / "y.safetensors")]) == cli.EXIT_ERROR
    assert "converts to a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.safetensors"]


@pytest.mark.filterwarnings("ignore:prompt is longer")  # the safety concept, in the tiny vocabulary
def test_cli_generate_from_a_single_file(tiny_ckpt, tiny_file, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", "a photo of the cat", "--weights", str(tiny_file), "--steps", "2", "--height", "32",
            "--width", "32", "--seed", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    tokenizer = ["--tokenizer", str(tiny_ckpt / "tokenizer")]
    assert cli.main(args + tokenizer) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(args + tokenizer + ["--overwrite", "--ema"]) == cli.EXIT_ERROR  # the tiny file has no EMA copy
    assert "needs the EMA copy of the UNet" in capsys.readouterr().err
    assert cli.main(args[:2] + ["--weights", str(tiny_ckpt), "--ema", "--out", str(tmp_path / "x.png")]) == 1
    assert "applies to single-file checkpoints only" in capsys.readouterr().err



# ---------------------------------------------------------------- convert writes a folder that loads, or nothing

def test_convert_refuses_before_writing_a_folder_that_would_not_load(tiny_ckpt, tiny_file, tmp_path, capsys,
                                                                     monkeypatch):
    """A single file carries no tokenizer: the folder gets CLIP's 49408 tokens unless --tokenizer says otherwise,
    and those must fit the text encoder's embedding (the tiny one has 531 rows). Refused from the header and the
    tokenizer alone, before a tensor is read or a file written; with the model's tokenizer the folder loads."""
    def refuse(*a, **kw):
        raise AssertionError("a tensor was read before the conversion was checked")
    monkeypatch.setattr(weights, "read_tensors", refuse)
    dst = tmp_path / "new" / "folder"
    with pytest.raises(WeightsError) as err:
        convert(tiny_file, dst)
    assert str(err.value) == (f"the tokenizer has 49408 tokens but the text encoder of {tiny_file} embeds only "
                              f"{tiny.VOCAB_SIZE}; pass this model's tokenizer (tokenizer= / --tokenizer DIR)")
    assert cli.main(["convert", str(tiny_file), str(dst)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"sld-minimal: error: {err.value}\n"
    empty = Path(shutil.copytree(tiny_ckpt / "tokenizer", tmp_path / "tok"))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    assert cli.main(["convert", str(tiny_file), str(dst), "--tokenizer", str(empty)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == (f"sld-minimal: error: {empty / 'merges.txt'} holds no merges, so every word "
                                       f"would be spelt byte by byte; download the model again or pass another "
                                       f"--tokenizer\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # nothing written, not even the parent folder
    monkeypatch.undo()
    back = convert(tiny_file, dst, tokenizer=tiny_ckpt)
    assert len(StableDiffusion.from_pretrained(back).tokenizer) == tiny.VOCAB_SIZE


def test_scheduler_values_checked_in_both_layouts(tiny_ckpt, tiny_file, tmp_path):
    """A bad value in a single file's stored scheduler config is refused when it is loaded or converted; a folder's
    is refused when it is converted to a file (not carried into it)."""
    meta = safe_open(str(tiny_file), "pt").metadata()
    stored = json.loads(meta[single_file.META_KEY])
    stored["scheduler"]["beta_end"] = 5
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(tiny_file), bad, metadata=meta | {single_file.META_KEY: json.dumps(stored)})
    message = f"{bad} (scheduler config): key 'beta_end' must be between 0 and 1 (exclusive), got 5.0"
    for call in (lambda: StableDiffusion.from_pretrained(bad, tokenizer=tiny_ckpt),
                 lambda: convert(bad, tmp_path / "folder", tokenizer=tiny_ckpt)):
        with pytest.raises(WeightsError) as err:
            call()
        assert str(err.value) == message
    folder = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_train_timesteps": 0}))
    with pytest.raises(WeightsError) as err:
        convert(folder, tmp_path / "m.safetensors")
    assert str(err.value) == f"{config}: key 'num_train_timesteps' must be at least 1, got 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "m"]
