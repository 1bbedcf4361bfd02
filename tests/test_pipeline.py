"""The generation loop against diffusers' StableDiffusionPipelineSafe and SemanticStableDiffusionPipeline.

Two levels: (1) the *loop* — our pipeline driving the oracle's own UNet, text encoder and VAE, so that scheduler,
guidance and batching are compared alone; (2) end to end with our own modules loaded from the same files."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sld_minimal import __version__, guidance as G, presets
from sld_minimal.testing import rel_err
from sld_minimal.guidance import Edit, SafetyConfig
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.vae import VAEConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LOOP_TOL = 1e-5  # same modules in both: only float rounding may differ
E2E_TOL = 1e-4   # our modules vs theirs, through the whole loop (the bound)


# ---------------------------------------------------------------- the oracles

class OracleUNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.ref, self.conv_in = unet, unet.conv_in  # conv_in: the pipeline reads device and dtype from it

    def forward(self, x, t, ctx):
        return self.ref(x, t, encoder_hidden_states=ctx).sample


class OracleText(nn.Module):
    def __init__(self, te):
        super().__init__()
        self.ref = te

    def forward(self, ids):
        return self.ref(ids).last_hidden_state


class OracleVAE(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.ref, self.post_quant_conv = vae, vae.post_quant_conv
        self.config = VAEConfig(block_out_channels=tuple(vae.config.block_out_channels))  # the pipeline reads its factor

    def forward(self, latents):
        return (self.ref.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def oracle_parts(tiny_ckpt):
    d = str(tiny_ckpt)
    return dict(vae=diffusers.AutoencoderKL.from_pretrained(d, subfolder="vae").eval(),
                text_encoder=transformers.CLIPTextModel.from_pretrained(d, subfolder="text_encoder").eval(),
                tokenizer=transformers.CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
                unet=diffusers.UNet2DConditionModel.from_pretrained(d, subfolder="unet").eval())


def reference(cls, parts, scheduler, tiny_ckpt):
    sched_cls = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler,
                 "dpmpp2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler}[scheduler]
    pipe = cls(**parts, scheduler=sched_cls.from_pretrained(str(tiny_ckpt), subfolder="scheduler"),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shared_pipe(oracle_parts, tiny_ckpt):
    """Our loop around the oracle's modules."""
    from sld_minimal.diffusers_folder import load_scheduler_config

    p = oracle_parts
    return StableDiffusion(p["tokenizer"], OracleText(p["text_encoder"]), OracleUNet(p["unet"]), OracleVAE(p["vae"]),
                           load_scheduler_config(tiny_ckpt))


@pytest.fixture(scope="module")
def own_pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


def run_safe(oracle_parts, tiny_ckpt, prompt, safety, scheduler="pndm", seed=0, **kw):
    ref = reference(diffusers.StableDiffusionPipelineSafe, oracle_parts, scheduler, tiny_ckpt)
    if safety is None:
        sld = dict(sld_guidance_scale=0.0)
    else:
        ref.safety_concept = safety.concept
        sld = dict(sld_guidance_scale=safety.scale, sld_warmup_steps=safety.warmup_steps,
                   sld_threshold=safety.threshold, sld_momentum_scale=safety.momentum_scale,
                   sld_mom_beta=safety.momentum_beta)
    n = kw.pop("num_images", 1)
    return ref(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", num_images_per_prompt=n,
               **sld, **kw).images


# The tiny VAE downsamples by 2, so 40×56 px is a 20×28 latent: non-square, not a multiple of 8 or 64 in latent
# units at the UNet's two levels (upsamplers resize to the odd skip sizes).
CASES = {
    "medium": dict(safety="medium"),
    "strong": dict(safety="strong"),
    "max": dict(safety="max"),
    "weak": dict(safety="weak"),
    "off": dict(safety=None),
    "ddim": dict(safety="strong", scheduler="ddim"),
    "ddim-eta": dict(safety="medium", scheduler="ddim", eta=0.7),
    "dpmpp2m": dict(safety="strong", scheduler="dpmpp2m"),   # the registry's newer samplers, swapped into
    "euler": dict(safety="max", scheduler="euler"),          # the reference pipeline the same way
    "negative": dict(safety="medium", negative_prompt="a dog"),
    "batch": dict(safety="strong", prompt=["a photo of the cat", "the king"], num_images=2,
                  negative_prompt=["", "a dog"]),
    "non-square": dict(safety="medium", height=40, width=56),
    "odd-size": dict(safety="max", height=72, width=24),
    "concept": dict(safety=dataclasses.replace(G.PRESETS["strong"], concept="a photo of the dog")),
    "custom-values": dict(safety=SafetyConfig(scale=500, warmup_steps=3, threshold=0.0, momentum_scale=0.2,
                                              momentum_beta=0.5)),
    "no-cfg": dict(safety=None, guidance_scale=1.0),
}


def call_both(pipe, oracle_parts, tiny_ckpt, case, steps=12):
    kw = dict(CASES[case])
    prompt = kw.pop("prompt", "a photo of the cat")
    safety = kw.pop("safety")
    safety = SafetyConfig.preset(safety) if isinstance(safety, str) else safety
    kw = dict(height=32, width=32, num_inference_steps=steps) | kw
    ours = pipe(prompt, safety=safety, seed=0, progress=False, **kw)
    ref = run_safe(oracle_parts, tiny_ckpt, prompt, safety, **kw)
    return ours, ref


@pytest.mark.parametrize("case", list(CASES))
def test_loop_matches_safe_pipeline_with_shared_modules(shared_pipe, oracle_parts, tiny_ckpt, case):
    ours, ref = call_both(shared_pipe, oracle_parts, tiny_ckpt, case)
    assert ours.images.shape == ref.shape
    assert rel_err(ours.images, ref) <= LOOP_TOL


@pytest.mark.parametrize("case", ["medium", "strong", "max", "ddim-eta", "dpmpp2m", "euler", "batch", "odd-size",
                                  "off"])
def test_end_to_end_with_own_modules(own_pipe, oracle_parts, tiny_ckpt, case):
    ours, ref = call_both(own_pipe, oracle_parts, tiny_ckpt, case, steps=20)
    assert rel_err(ours.images, ref) <= E2E_TOL


# ---------------------------------------------------------------- SEGA against SemanticStableDiffusionPipeline

SEGA_CASES = {
    "one": [Edit("the king", scale=6, threshold=0.8, warmup_steps=2)],
    "two-reverse": [Edit("the king", scale=5, threshold=0.9, warmup_steps=3),
                    Edit("a dog", reverse=True, scale=4, threshold=0.7, warmup_steps=1)],
    "cooldown-weights": [Edit("the king", scale=7, threshold=0.85, warmup_steps=0, cooldown_steps=8, weight=2.0),
                         Edit("a dog", reverse=True, scale=3, threshold=0.5, warmup_steps=4, weight=0.5)],
}


def run_semantic(oracle_parts, tiny_ckpt, edits, momentum_scale, momentum_beta, **kw):
    ref = reference(diffusers.SemanticStableDiffusionPipeline, oracle_parts, "pndm", tiny_ckpt)
    return ref("a photo of the cat", generator=torch.Generator().manual_seed(0), output_type="np",
               editing_prompt=[e.concept for e in edits], reverse_editing_direction=[e.reverse for e in edits],
               edit_guidance_scale=[e.scale for e in edits], edit_threshold=[e.threshold for e in edits],
               edit_warmup_steps=[e.warmup_steps for e in edits],
               edit_cooldown_steps=[e.cooldown_steps if e.cooldown_steps is not None else 10**6 for e in edits],
               edit_weights=[e.weight for e in edits], edit_momentum_scale=momentum_scale,
               edit_mom_beta=momentum_beta, **kw).images


@pytest.mark.parametrize("case", list(SEGA_CASES))
@pytest.mark.parametrize("which", ["shared", "own"])
def test_sega_matches_semantic_pipeline(shared_pipe, own_pipe, oracle_parts, tiny_ckpt, case, which):
    pipe = shared_pipe if which == "shared" else own_pipe
    kw = dict(height=32, width=40, num_inference_steps=12)
    edits = SEGA_CASES[case]
    ours = pipe("a photo of the cat", safety=None, edits=edits, edit_momentum_scale=0.3, edit_momentum_beta=0.6,
                seed=0, progress=False, **kw)
    ref = run_semantic(oracle_parts, tiny_ckpt, edits, 0.3, 0.6, **kw)
    assert rel_err(ours.images, ref) <= (LOOP_TOL if which == "shared" else E2E_TOL)


def test_sega_safety_matches_semantic_pipeline(own_pipe, tiny_ckpt):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    d = str(tiny_ckpt)
    ref = diffusers.SemanticStableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(d, subfolder="vae").eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(d, subfolder="text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(d, subfolder="unet").eval(),
        scheduler=diffusers.PNDMScheduler.from_pretrained(d, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # The authors' harness (mitigation/semantic_ssd.py) for "strong": the concept as a reversed edit. A concept
    # of at most 77 tokens: diffusers' SEGA pipeline cuts longer ones after tokenising, dropping CLIP's end token,
    # where ours (and diffusers' safe pipeline) keep it. (The default concept is 52 tokens with SD 1.4's
    # vocabulary; with this tiny model's vocabulary it would be longer.)
    concept = "nudity, blood, violence"
    theirs = ref("a photo of the cat", generator=torch.Generator().manual_seed(0), output_type="np",
                 height=32, width=40, num_inference_steps=12, guidance_scale=7.5,
                 editing_prompt=[concept], reverse_editing_direction=[True], edit_guidance_scale=[7],
                 edit_threshold=[0.85], edit_warmup_steps=[5], edit_momentum_scale=0.5, edit_mom_beta=0.4).images
    ours = own_pipe("a photo of the cat", safety=presets.safety_configs("sega-strong", concept), height=32, width=40,
                    num_inference_steps=12, seed=0, progress=False)
    assert rel_err(ours.images, theirs) <= E2E_TOL



def test_sld_and_sega_together_follow_the_formula(own_pipe):
    """ε̂ = sld_guidance(…) + sega_guidance(…), step by step, with each term's diagnostics reported."""
    edits = [Edit("the king", scale=5, threshold=0.8, warmup_steps=1)]
    safety = SafetyConfig.preset("max")
    seen = []
    out = own_pipe("a photo of the cat", safety=safety, edits=edits, seed=3, height=32, width=32,
                   num_inference_steps=6, progress=False, callback=seen.append)
    for info in seen:
        assert info.mu is not None and 0 <= info.sld_active <= 1 and info.safety_norm >= 0
        assert len(info.edits) == 1 and 0 < info.edits[0]["kept"] <= 1
    momentum = edit_momentum = None
    # recompute the guided ε of every step from the UNet's branches and compare
    ctx = torch.cat([own_pipe.encode_prompt([""]), own_pipe.encode_prompt(["a photo of the cat"]),
                     own_pipe.encode_concept(safety.concept), own_pipe.encode_concept("the king")])
    for info in seen:
        e_u, e_p, e_s, e_c = own_pipe.unet(torch.cat([info.latents] * 4), info.timestep, ctx).chunk(4)
        eps, momentum = G.sld_guidance(e_u, e_p, e_s, 7.5, safety, info.step, momentum)
        term, edit_momentum = G.sega_guidance(e_u, [e_c], edits, info.step, edit_momentum, 0.1, 0.4)
        assert rel_err(info.eps, eps + term) <= 1e-6
    assert out.images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- behaviour of the loop itself

@pytest.mark.bitexact
def test_skipping_the_safety_branch_is_exact(own_pipe):
    """With s_m = 0 the safety branch cannot matter during warm-up; skipping it changes no bit."""
    kw = dict(safety="weak", seed=5, height=32, width=32, num_inference_steps=20, progress=False)
    calls = []
    handle = own_pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        skipped = own_pipe("a photo of the cat", **kw)
        assert calls[:15] == [2] * 15 and set(calls[15:]) == {3}  # weak: δ = 15, PNDM: 21 calls
        calls.clear()
        full = own_pipe("a photo of the cat", guidance=G.sld_guidance, **kw)  # a custom function: never skipped
        assert set(calls) == {3}
    finally:
        handle.remove()
    assert np.array_equal(skipped.images, full.images) and torch.equal(skipped.latents, full.latents)


def test_each_concept_is_encoded_once_per_pipeline(tiny_ckpt):
    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    batches = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    for seed in (0, 1):
        pipe("a photo of the cat", safety="max", seed=seed, height=16, width=16, num_inference_steps=2, progress=False)
    handle.remove()
    assert batches == [1, 1, 1] + [1, 1]  # run 1: prompt, ∅, concept; run 2: prompt, ∅ (concept cached)


def test_callback_info(own_pipe):
    seen = []
    own_pipe("a photo of the cat", safety="medium", seed=1, height=32, width=32, num_inference_steps=12,
             progress=False, callback=seen.append)
    assert [i.step for i in seen] == list(range(13))  # PNDM: steps + 1 calls
    for info in seen:  # medium: s_m ≠ 0, so μ is computed from step 0, but applied from δ = 10 on
        applied = info.step >= 10
        assert info.mu.shape == (1, 4, 16, 16) and info.applied == [applied]
        assert info.sld_active == ((info.mu > 0).float().mean().item() if applied else 0.0)
        assert info.cfg_norm > 0 and (info.safety_norm > 0) is applied and info.eps.shape == (1, 4, 16, 16)


@pytest.mark.bitexact
def test_custom_guidance_replaces_sld(own_pipe):
    calls = []

    def no_safety(eps_u, eps_p, eps_s, s_g, safety, step, momentum):
        calls.append(step)
        return G.cfg_guidance(eps_u, eps_p, s_g), momentum

    kw = dict(seed=2, height=32, width=32, num_inference_steps=5, progress=False)
    out = own_pipe("a photo of the cat", safety="max", guidance=no_safety, **kw)
    plain = own_pipe("a photo of the cat", safety=None, **kw)
    assert calls == list(range(6)) and np.array_equal(out.images, plain.images)


@pytest.mark.bitexact
def test_seed_and_generator(own_pipe):
    kw = dict(safety="medium", height=16, width=16, num_inference_steps=3, progress=False)
    a, b = own_pipe("a photo of the cat", seed=7, **kw), own_pipe("a photo of the cat", seed=7, **kw)
    assert a.seed == 7 and np.array_equal(a.images, b.images)
    drawn = own_pipe("a photo of the cat", **kw)
    assert isinstance(drawn.seed, int)
    again = own_pipe("a photo of the cat", seed=drawn.seed, **kw)
    assert np.array_equal(drawn.images, again.images)
    g = torch.Generator().manual_seed(7)
    first, second = own_pipe("a photo of the cat", generator=g, **kw), own_pipe("a photo of the cat", generator=g, **kw)
    assert np.array_equal(first.images, a.images) and not np.array_equal(second.images, a.images)


def test_outputs_are_prompt_major(own_pipe):
    kw = dict(safety=None, seed=4, height=16, width=16, num_inference_steps=3, progress=False)
    both = own_pipe(["a photo of the cat", "the king"], num_images=2, **kw)
    assert both.images.shape == (4, 16, 16, 3) and both.latents.shape == (4, 4, 8, 8)
    assert both.images.dtype == np.float32 and 0 <= both.images.min() and both.images.max() <= 1
    assert "a photo of the cat" in both.parameters[1] and "the king" in both.parameters[2]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(height=31), "height must be a positive multiple of 2 \\(this model's VAE factor\\), got 31"),
    (dict(width=0), "width must be a positive multiple of 2"),
    (dict(num_inference_steps=0), "num_inference_steps must be from 1 to 999, got 0"),
    (dict(num_inference_steps=1000), "num_inference_steps must be from 1 to 999"),
    (dict(num_inference_steps=2.0), "num_inference_steps must be an integer, got float"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(num_images=0), "num_images must be >= 1"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'; choose one of ddim, pndm, dpmpp2m, euler"),
    (dict(eta=0.5), "applies to the DDIM scheduler only"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompts"),
    (dict(safety="extreme"), "unknown safety preset 'extreme'; choose one of off, weak, medium, strong, max"),
])
def test_bad_arguments_fail_before_any_work(own_pipe, kwargs, pattern):
    calls = []
    handle = own_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=pattern):
            own_pipe("a photo of the cat", progress=False, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_nan_latents_stop_with_the_step(own_pipe):
    from sld_minimal import schedulers

    poisoned_t = schedulers.PNDM(5).timesteps.tolist()[3]  # [801, 601, 601, 401, …]: step 3 is t = 401
    handle = own_pipe.unet.register_forward_hook(lambda m, args, out: out * float("nan") if args[1] == poisoned_t else out)
    try:
        with pytest.raises(FloatingPointError, match="at step 3 "):
            own_pipe("a photo of the cat", safety=None, seed=0, height=16, width=16, num_inference_steps=5,
                     progress=False)
    finally:
        handle.remove()


def test_low_guidance_warns_and_runs_one_branch(own_pipe):
    calls = []
    handle = own_pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with pytest.warns(UserWarning, match="turns classifier-free guidance off"):
            own_pipe("a photo of the cat", safety="strong", guidance_scale=1.0, seed=0, height=16, width=16,
                     num_inference_steps=3, progress=False)
    finally:
        handle.remove()
    assert set(calls) == {1}


def test_save_writes_pngs_with_parameters(own_pipe, tmp_path):
    from PIL import Image

    out = own_pipe("a photo of the cat", safety="strong", seed=9, num_images=2, height=16, width=16,
                   num_inference_steps=2, progress=False)
    paths = out.save(tmp_path / "new" / "cat.png")
    assert [p.name for p in paths] == ["cat-0.png", "cat-1.png"]
    text = Image.open(paths[0]).text["parameters"]
    for needle in ("a photo of the cat", "Seed: 9", "Steps: 2", "Guidance: 7.5", "Scheduler: pndm", "Size: 16x16",
                   "Safety: strong (scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, "
                   "momentum_beta=0.7)", "Safety concept: an image showing hate", f"sld_minimal {__version__}"):
        assert needle in text
    img = np.asarray(Image.open(paths[1])) / 255
    assert np.abs(img - out.images[1]).max() <= 0.5 / 255 + 1e-6


def test_seed_and_generator_together_are_refused(own_pipe):
    """Both given, one would be ignored without a word: refused before any work, in one line."""
    calls = []
    handle = own_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError) as err:
            own_pipe("a photo of the cat", seed=1, generator=torch.Generator().manual_seed(1), progress=False)
        assert str(err.value) == "pass seed= or generator=, not both: the noise comes from one of them"
        with pytest.raises(TypeError) as err:
            own_pipe("a photo of the cat", generator=1, progress=False)
        assert str(err.value) == "generator must be a torch.Generator, got int"
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "device='cuda': no such device on this machine (try device='cpu')"),
    (torch.device("cuda", 0), 0, "device='cuda:0': no such device on this machine (try device='cpu')"),
    ("cuda:1", 1, "device='cuda:1': no such device on this machine (try device='cpu'; it has one CUDA device, cuda:0)"),
    ("cuda:2", 2, "device='cuda:2': no such device on this machine (try device='cpu'; it has 2 CUDA devices, cuda:0 "
                  "to cuda:1)"),
    ("mps", 0, "device='mps': no such device on this machine (try device='cpu')"),
    ("gpu", 0, "device='gpu' is not a device (try device='cpu')"),
])
def test_a_device_this_machine_lacks_is_refused_before_any_file(tmp_path, monkeypatch, device, gpus, message):
    """The command line's `--device` rule for the Python API: one line, before the model (here: absent) is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        StableDiffusion.from_pretrained(tmp_path / "absent", device=device)
    assert str(err.value) == message
