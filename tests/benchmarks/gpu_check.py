"""GPU check of sld_minimal against diffusers' StableDiffusionPipelineSafe, on one CUDA device, in one run.

    bash tests/benchmarks/gpu_check.sh                 # on the GPU machine (installs .whl/*.whl, then runs this)
    python tests/benchmarks/gpu_check.py --device cpu --config tiny --quick --json /tmp/gpu_check.json  # dry run

Sections, each in its own try/except (a failure prints one line, its traceback goes to the JSON, the run goes on);
the JSON of all figures is rewritten after every section, to `$OUT/gpu_check.json` (or `./gpu_check.json`):

1. weights: the full-size SD 1.4 checkpoint with random weights,
   `sld_minimal.testing.tiny.write_checkpoint(DIR, "sd14")` (~4.3 GB; reused if DIR/model_index.json exists, which is
   written last).
2. fp32 parity, TF32 off: our UNet, CLIP text encoder and VAE decoder against diffusers' `UNet2DConditionModel`,
   transformers' `CLIPTextModel` and diffusers' `AutoencoderKL.decode`, same inputs as tests/test_{clip,unet,vae}.py but at
   the image size's latent (64×64 at 512 px): rel = max|ours − ref| / max|ref|, against the CPU tolerance 1e-5.
   Then a short generation (SLD strong, PNDM, seed 0) from our pipeline and from the Safe pipeline built around the
   reference modules: max and mean |Δpixel| in [0, 1], and the decoder input (latents / 0.18215) compared.
3. fp16, then bf16 (each side loaded in that dtype, one side at a time so that GPU memory is per side): the same
   short generation on both sides, compared with each other and with each side's fp32 image; then the speed run:
   512 px, SLD strong, 50 PNDM steps (51 UNet calls at batch 3), batch 1, after one warm-up generation:
   it/s = UNet calls / denoising-loop seconds (first UNet call to the VAE decode, synchronized, as diffusers'
   progress bar counts), total seconds of the pipeline call, peak GPU memory (`max_memory_allocated`, reset before
   each timed run; weights included), median over `--runs`. The side order alternates between dtypes. bf16's speed
   run is skipped when the time so far plus fp16's section would pass `--budget`.

Seeds: both sides draw the initial latents with a CPU torch.Generator seeded 0, in the model's dtype.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's sld_minimal, installed or not

PROMPT = "a photo of a cat sitting on a wooden table, detailed, soft light"
SEED = 0
TOL = 1e-5        # fp32 module parity on the CPU (tests/test_clip.py, test_unet.py, test_vae.py): max|ours − ref| / max|ref|
TARGET_ITS = 1.1  # the target: ours ≥ 1.1× diffusers' it/s

T0 = time.perf_counter()
R = {"sections": {}, "errors": {}}  # every figure; written to JSON after each section
A = None  # the parsed arguments


# ================================================================ small helpers

def log(msg=""):
    print(msg, flush=True)


def elapsed():
    return time.perf_counter() - T0


def save():
    path = A.json or Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(R, indent=1, default=str))
    except OSError as e:
        log(f"!! could not write {path}: {e}")


def section(name, fn, *args):
    """Run one section; a failure is one printed line (plus the traceback in the JSON), and the run goes on."""
    t0 = time.perf_counter()
    log(f"\n== {name}  (t = {elapsed():.0f} s)")
    status = "ok"
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (the point: one failure must not stop the rest)
        status = f"FAILED: {one_line(e)}"
        log(f"!! {name} FAILED: {one_line(e)}")
        R["errors"][name] = traceback.format_exc()[-4000:]
    finally:
        free()
    R["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
    log(f"-- {name}: {status} in {time.perf_counter() - t0:.1f} s")
    save()


def one_line(e):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def free():
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync():
    import torch

    if A.device == "cuda":
        torch.cuda.synchronize()


def gib(n):
    return None if n is None else n / 2**30


def mem_allocated():
    import torch

    return torch.cuda.memory_allocated() if A.device == "cuda" else None


def reset_peak():
    import torch

    if A.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_allocated():
    import torch

    return torch.cuda.max_memory_allocated() if A.device == "cuda" else None


def rel_err(ours, ref) -> float:
    """max|ours − ref| / max|ref|, in float64 on the CPU."""
    import torch

    ours, ref = torch.as_tensor(ours).detach().double().cpu(), torch.as_tensor(ref).detach().double().cpu()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def dtype_of(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def tf_kwargs(dtype):
    """transformers 5 takes `dtype=`, 4.x `torch_dtype=`."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


# ================================================================ 0. the machine

def environment():
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": A.device, "config": A.config, "size": A.size, "args": {k: str(v) for k, v in vars(A).items()}}
    for pkg in ("diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001
            info[pkg] = f"unavailable ({one_line(e)})"
    if A.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "cudnn": torch.backends.cudnn.version()}
    R["environment"] = info
    log("  " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "args"))


# ================================================================ 1. the weights

def write_weights():
    folder = Path(A.weights)
    if (folder / "model_index.json").is_file():
        log(f"  reusing {folder} (model_index.json present)")
    else:
        from sld_minimal.testing import tiny

        log(f"  writing the {A.config} random checkpoint to {folder} …")
        t0 = time.perf_counter()
        tiny.write_checkpoint(folder, A.config)
        R["weights_write_s"] = round(time.perf_counter() - t0, 1)
        log(f"  written in {R['weights_write_s']} s")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    R["weights"] = {"folder": str(folder), "gb": round(size / 1e9, 2)}
    log(f"  {size / 1e9:.2f} GB")


# ================================================================ the two pipelines, driven alike

class LoopTimer:
    """Forward hooks: the first UNet call of a generation (synchronized) to the first VAE call (synchronized) is the
    denoising loop; UNet calls are counted; the VAE's first input (latents / 0.18215 when the hook is on
    post_quant_conv) is kept for comparison."""

    def __init__(self, unet, vae_first):
        self.handles = [unet.register_forward_pre_hook(self._unet), vae_first.register_forward_pre_hook(self._vae)]
        self.reset()

    def reset(self):
        self.calls, self.t_first, self.t_vae, self.z = 0, None, None, None

    def _unet(self, module, args):
        if self.calls == 0:
            sync()
            self.t_first = time.perf_counter()
        self.calls += 1

    def _vae(self, module, args):
        if self.t_vae is None:
            sync()
            self.t_vae = time.perf_counter()
            self.z = args[0].detach().float().cpu()

    @property
    def loop_s(self):
        return None if self.t_first is None or self.t_vae is None else self.t_vae - self.t_first

    def remove(self):
        for h in self.handles:
            h.remove()


def sld_kwargs():
    """diffusers' SLD arguments from our preset table (as tests/test_pipeline.py and bench.py pass them)."""
    from sld_minimal.guidance import PRESETS

    s = PRESETS[A.safety]
    return s.concept, {"sld_guidance_scale": s.scale, "sld_warmup_steps": s.warmup_steps,
                       "sld_threshold": s.threshold, "sld_momentum_scale": s.momentum_scale,
                       "sld_mom_beta": s.momentum_beta}


def ours_side(pipe):
    """(generate(steps) -> images (N, H, W, 3) in [0, 1], unet, the module whose pre-hook marks the decode)."""
    def generate(steps):
        return pipe(PROMPT, safety=A.safety, num_inference_steps=steps, guidance_scale=7.5, height=A.size,
                    width=A.size, seed=SEED, progress=False).images

    return generate, pipe.unet, getattr(pipe.vae, "post_quant_conv", pipe.vae)


def diffusers_side(pipe):
    import torch

    pipe.set_progress_bar_config(disable=True)
    concept, sld = sld_kwargs()
    pipe.safety_concept = concept

    def generate(steps):
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=A.size, width=A.size,
                    output_type="np", generator=torch.Generator("cpu").manual_seed(SEED), **sld).images

    return generate, pipe.unet, pipe.vae.post_quant_conv


def load_ours(dtype):
    from sld_minimal import StableDiffusion

    return StableDiffusion.from_pretrained(str(A.weights), device=A.device, dtype=dtype)


def load_diffusers(dtype):
    from diffusers import StableDiffusionPipelineSafe

    return StableDiffusionPipelineSafe.from_pretrained(
        str(A.weights), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=dtype).to(A.device)


def image_run(generate, timer, steps):
    """One generation: images (numpy float32) and the decoder input z (CPU float32)."""
    import numpy as np

    timer.reset()
    images = np.asarray(generate(steps), dtype=np.float32)
    sync()
    return images, timer.z


def image_stats(img):
    import numpy as np

    finite = bool(np.isfinite(img).all())
    return {"finite": finite, "mean": float(np.nanmean(img)), "std": float(np.nanstd(img)),
            "unsaturated": float(((img > 0) & (img < 1)).mean())}  # share of pixels strictly inside (0, 1)


def compare_images(label, a_img, b_img, a_z=None, b_z=None):
    """Print and return max/mean |Δpixel| (and the decoder inputs' rel error)."""
    import numpy as np

    if a_img.shape != b_img.shape:
        raise ValueError(f"{label}: image shapes differ, {a_img.shape} vs {b_img.shape}")
    d = np.abs(a_img.astype(np.float64) - b_img.astype(np.float64))
    out = {"max_abs": float(np.nanmax(d)) if np.isfinite(d).any() else None,
           "mean_abs": float(np.nanmean(d)) if np.isfinite(d).any() else None,
           "nonfinite_pixels": int((~np.isfinite(d)).sum())}
    if a_z is not None and b_z is not None and a_z.shape == b_z.shape:
        out["z_rel"] = rel_err(a_z, b_z)
    log(f"  {label}: max |Δpixel| = {fmt(out['max_abs'], '.2e')}, mean |Δpixel| = {fmt(out['mean_abs'], '.2e')}"
        + (f", decoder input rel = {out['z_rel']:.2e}" if "z_rel" in out else "")
        + (f", NON-FINITE pixels: {out['nonfinite_pixels']}" if out["nonfinite_pixels"] else ""))
    return out


# ================================================================ 2. fp32 parity, TF32 off

def fp32_parity():
    import torch

    legacy = None
    if A.device == "cuda":
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        _fp32_parity()
    finally:
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


def _fp32_parity():
    import torch
    import diffusers
    import transformers

    res = R.setdefault("fp32", {"tolerance": TOL})
    if A.device == "cuda":
        res["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    d, f32 = str(A.weights), torch.float32
    ours = load_ours(f32)
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(d, subfolder="unet", torch_dtype=f32).to(A.device).eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(d, subfolder="vae", torch_dtype=f32).to(A.device).eval()
    ref_text = transformers.CLIPTextModel.from_pretrained(d, subfolder="text_encoder", **tf_kwargs(f32))
    ref_text = ref_text.to(A.device).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")

    def verdict(name, rel):
        res[name] = {"rel": rel, "pass": rel <= TOL}
        log(f"  {name:<13} rel = {rel:.2e}  ({'pass' if rel <= TOL else 'FAIL'} at {TOL:g})")

    f = 2 ** (len(ref_vae.config.block_out_channels) - 1)  # the VAE's downscale: 8 for SD 1.4
    h = A.size // f
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=g).to(A.device)
    ctx = torch.randn(2, 77, ref_unet.config.cross_attention_dim, generator=g).to(A.device)
    z = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(1)).to(A.device)
    ids = tokenizer(["a photo of the cat", "the king of dogs, in the rain", ""], padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids.to(A.device)
    with torch.no_grad():
        try:
            rels = []
            for t in (981, 1, torch.tensor([500, 20], device=A.device)):
                rels.append(rel_err(ours.unet(x, t, ctx), ref_unet(x, t, encoder_hidden_states=ctx).sample))
            res["unet_per_t"] = rels
            verdict(f"UNet ({h}×{h})", max(rels))
        except Exception as e:  # noqa: BLE001
            log(f"  UNet parity FAILED: {one_line(e)}")
            R["errors"]["fp32 UNet"] = traceback.format_exc()[-3000:]
        try:
            verdict("CLIP text", rel_err(ours.text_encoder(ids), ref_text(ids).last_hidden_state))
        except Exception as e:  # noqa: BLE001
            log(f"  CLIP parity FAILED: {one_line(e)}")
            R["errors"]["fp32 CLIP"] = traceback.format_exc()[-3000:]
        try:
            ref_img = (ref_vae.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)
            verdict(f"VAE decode ({h * f} px)", rel_err(ours.vae(z), ref_img))
        except Exception as e:  # noqa: BLE001
            log(f"  VAE parity FAILED: {one_line(e)}")
            R["errors"]["fp32 VAE"] = traceback.format_exc()[-3000:]
    del x, ctx, z

    # the short generation in fp32: our pipeline vs the Safe pipeline around the reference modules
    ref_pipe = diffusers.StableDiffusionPipelineSafe(
        vae=ref_vae, text_encoder=ref_text, tokenizer=tokenizer, unet=ref_unet,
        scheduler=diffusers.PNDMScheduler.from_pretrained(d, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    images = {}
    for side, make in (("ours", lambda: ours_side(ours)), ("diffusers", lambda: diffusers_side(ref_pipe))):
        try:
            generate, unet, vae_first = make()
            timer = LoopTimer(unet, vae_first)
            try:
                images[side] = image_run(generate, timer, A.image_steps)
            finally:
                timer.remove()
            s = res[f"image_{side}"] = image_stats(images[side][0])
            log(f"  {side:<9} fp32 image: mean {s['mean']:.3f}, std {s['std']:.3f}, {s['unsaturated']:.0%} of "
                f"pixels inside (0, 1)" + ("" if s["finite"] else ", NON-FINITE pixels"))
        except Exception as e:  # noqa: BLE001
            log(f"!! fp32 image, {side}, FAILED: {one_line(e)}")
            R["errors"][f"fp32 image {side}"] = traceback.format_exc()[-4000:]
    IMAGES["fp32"] = {side: img for side, (img, _) in images.items()}
    if len(images) == 2:
        res["image"] = compare_images(f"fp32 image, {A.size} px, {A.image_steps} steps, ours vs diffusers",
                                      images["ours"][0], images["diffusers"][0], images["ours"][1],
                                      images["diffusers"][1])


IMAGES = {}  # dtype -> side -> image (numpy), for the cross-dtype comparisons


# ================================================================ 3. fp16 / bf16: images, then speed

def run_side(side, dtype_name, speed):
    """Load one side in `dtype_name`, make the short image, then (if `speed`) one warm-up and the timed runs."""
    dtype = dtype_of(dtype_name)
    free()
    reset_peak()
    base = mem_allocated()
    t0 = time.perf_counter()
    pipe = load_ours(dtype) if side == "ours" else load_diffusers(dtype)
    sync()
    out = {"load_s": time.perf_counter() - t0}
    if base is not None:  # base: what an earlier side left allocated (should be ~0: peaks are then per side)
        out["base_gib"], out["weights_gib"] = gib(base), gib(mem_allocated() - base)
        if base > 2**28:
            log(f"  (warning: {gib(base):.2f} GiB still allocated before loading {side}; its peaks include it)")
    generate, unet, vae_first = ours_side(pipe) if side == "ours" else diffusers_side(pipe)
    timer = LoopTimer(unet, vae_first)
    try:
        img, z = image_run(generate, timer, A.image_steps)
        out["image"] = image_stats(img[0])
        out["image_unet_calls"] = timer.calls
        if speed:
            generate(A.warmup_steps)  # warm-up: kernels chosen, allocator grown, at the same size and batch
            sync()
            runs = []
            for _ in range(A.runs):
                free()
                reset_peak()
                timer.reset()
                sync()
                t1 = time.perf_counter()
                generate(A.speed_steps)
                sync()
                total = time.perf_counter() - t1
                loop = timer.loop_s
                runs.append({"total_s": total, "loop_s": loop, "unet_calls": timer.calls,
                             "it_s": timer.calls / (loop if loop else total),
                             "peak_gib": gib(peak_allocated())})
            out["runs"] = runs
            out["speed"] = {k: statistics.median(v) if (v := [r[k] for r in runs if r[k] is not None]) else None
                            for k in ("it_s", "total_s", "loop_s", "peak_gib")}
            out["speed"]["unet_calls"] = runs[0]["unet_calls"]
            out["speed"]["loop_timed"] = runs[0]["loop_s"] is not None
    finally:
        timer.remove()
        del pipe, generate, unet, vae_first
        free()
    return out, img, z


def dtype_section(dtype_name, speed):
    res = R.setdefault(dtype_name, {})
    order = ["ours", "diffusers"] if dtype_name != "bf16" else ["diffusers", "ours"]
    images, zs = {}, {}
    for side in order:
        try:
            out, images[side], zs[side] = run_side(side, dtype_name, speed)
            res[side] = out
            s = out["image"]
            log(f"  {side:<9} loaded in {out['load_s']:.1f} s"
                + (f" ({out['weights_gib']:.2f} GiB on the GPU)" if out.get("weights_gib") is not None else "")
                + f"; image: mean {s['mean']:.3f}, std {s['std']:.3f}, {s['unsaturated']:.0%} inside (0, 1)"
                + ("" if s["finite"] else ", NON-FINITE pixels"))
            if "speed" in out:
                sp = out["speed"]
                log(f"  {side:<9} {dtype_name} {A.size} px, SLD {A.safety}, {A.speed_steps} steps "
                    f"({sp['unet_calls']} UNet calls): {sp['it_s']:.2f} it/s, {sp['total_s']:.2f} s total, "
                    f"peak {fmt(sp['peak_gib'], '.2f')} GiB  (median of {len(out['runs'])}: "
                    + ", ".join(f"{r['it_s']:.2f}" for r in out["runs"]) + " it/s)")
        except Exception as e:  # noqa: BLE001
            res[side] = {"status": f"FAILED: {one_line(e)}"}
            R["errors"][f"{dtype_name} {side}"] = traceback.format_exc()[-4000:]
            log(f"!! {dtype_name} {side} FAILED: {one_line(e)}")
            free()
    IMAGES[dtype_name] = dict(images)
    if len(images) == 2:
        res["image"] = compare_images(f"{dtype_name} image, {A.size} px, {A.image_steps} steps, ours vs diffusers",
                                      images["ours"][0], images["diffusers"][0], zs["ours"], zs["diffusers"])
    for side, img in images.items():  # how far each side's own half-precision image is from its fp32 one
        ref = IMAGES.get("fp32", {}).get(side)
        if ref is not None:
            res[f"{side}_vs_own_fp32"] = compare_images(f"{side} {dtype_name} vs {side} fp32", img[0], ref[0])
    if speed and all("speed" in res.get(s, {}) for s in ("ours", "diffusers")):
        o, d = res["ours"]["speed"], res["diffusers"]["speed"]
        ratio = o["it_s"] / d["it_s"]
        res["ratio_it_s"] = ratio
        res["ratio_total_s"] = o["total_s"] / d["total_s"]
        res["ratio_peak"] = (o["peak_gib"] / d["peak_gib"]) if o["peak_gib"] and d["peak_gib"] else None
        res["target_met"] = ratio >= TARGET_ITS
        log(f"  => {dtype_name}: ours/diffusers it/s = {ratio:.3f} (target ≥ {TARGET_ITS}: "
            f"{'met' if ratio >= TARGET_ITS else 'MISSED'}); total time ratio {res['ratio_total_s']:.3f}; "
            f"peak memory ratio {fmt(res['ratio_peak'], '.3f')}")


# ================================================================ main

def summary():
    log("\n== summary")
    fp32 = R.get("fp32", {})
    for k, v in fp32.items():
        if isinstance(v, dict) and "rel" in v:
            log(f"  fp32 parity {k}: rel {v['rel']:.2e} {'pass' if v['pass'] else 'FAIL'}")
    for dt in ("fp32", "fp16", "bf16"):
        im = R.get(dt, {}).get("image")
        if im:
            log(f"  {dt} image ours vs diffusers: max {fmt(im['max_abs'], '.2e')}, mean {fmt(im['mean_abs'], '.2e')}")
    for dt in ("fp16", "bf16"):
        res = R.get(dt, {})
        if "ratio_it_s" in res:
            o, d = res["ours"]["speed"], res["diffusers"]["speed"]
            log(f"  {dt} speed: ours {o['it_s']:.2f} it/s / {o['total_s']:.2f} s / {fmt(o['peak_gib'], '.2f')} GiB;"
                f" diffusers {d['it_s']:.2f} it/s / {d['total_s']:.2f} s / {fmt(d['peak_gib'], '.2f')} GiB;"
                f" ratio {res['ratio_it_s']:.3f} ({'met' if res['target_met'] else 'MISSED'})")
    bad = [k for k, v in R["sections"].items() if v["status"] != "ok"] + list(R["errors"])
    log(f"  failures: {', '.join(dict.fromkeys(bad)) if bad else 'none'}; total {elapsed():.0f} s")


def main(argv=None):
    global A
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--config", default="sd14", choices=["sd14", "small", "tiny"], help="checkpoint to write")
    p.add_argument("--weights", type=Path, help="checkpoint folder (default /tmp/sld_gpu_check_<config>; "
                                                "written if it has no model_index.json)")
    p.add_argument("--size", type=int, help="image size in px (default 512; 64 with --quick)")
    p.add_argument("--safety", default="strong", choices=["weak", "medium", "strong", "max"])
    p.add_argument("--image-steps", type=int, help="steps of the compared images (default 10; 2 with --quick)")
    p.add_argument("--speed-steps", type=int, help="steps of the timed generation (default 50; 2 with --quick)")
    p.add_argument("--warmup-steps", type=int, help="steps of the warm-up generation (default 10; 1 with --quick)")
    p.add_argument("--runs", type=int, help="timed generations per side and dtype, median (default 3; 1 --quick)")
    p.add_argument("--dtypes", default="fp16,bf16", help="half dtypes for images and speed (default fp16,bf16)")
    p.add_argument("--speed-dtypes", default="fp16,bf16", help="dtypes with a speed run (bf16's only if in budget)")
    p.add_argument("--budget", type=float, default=280, help="seconds; bf16's speed run is skipped if it would "
                                                              "pass this (default 280)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: fp32, fp16, bf16")
    p.add_argument("--quick", action="store_true", help="dry run: 64 px, 2 steps, 1 run (with --config tiny "
                                                        "--device cpu it takes seconds)")
    p.add_argument("--json", type=Path, help="where to write the figures (default $OUT/gpu_check.json, else "
                                             "./gpu_check.json)")
    A = p.parse_args(argv)
    q = A.quick
    A.size = A.size or (64 if q else 512)
    A.image_steps = A.image_steps or (2 if q else 10)
    A.speed_steps = A.speed_steps or (2 if q else 50)
    A.warmup_steps = A.warmup_steps or (1 if q else 10)
    A.runs = A.runs or (1 if q else 3)
    A.weights = A.weights or Path(f"/tmp/sld_gpu_check_{A.config}")
    skip = {s.strip() for s in A.skip.split(",") if s.strip()}
    speed_dtypes = {s.strip() for s in A.speed_dtypes.split(",") if s.strip()}

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import torch

    if A.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available (use --device cpu --quick for a dry run)")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except Exception as e:  # noqa: BLE001
        log(f"!! importing diffusers/transformers failed: {one_line(e)} (the comparisons will fail)")

    log(f"gpu_check: {A.config} weights, {A.size} px, SLD {A.safety}, images {A.image_steps} steps, speed "
        f"{A.speed_steps} steps × {A.runs} runs, device {A.device}")
    section("environment", environment)
    section("weights", write_weights)
    if "fp32" not in skip:
        section("fp32 parity (TF32 off)", fp32_parity)
    for dt in [s.strip() for s in A.dtypes.split(",") if s.strip()]:
        if dt in skip:
            continue
        speed = dt in speed_dtypes
        if speed and dt != "fp16":  # the fp16 section's time estimates this one's
            estimate = next((v["seconds"] for k, v in R["sections"].items() if k.startswith("fp16 images")), 0)
            if elapsed() + estimate > A.budget:
                log(f"\n(skipping the {dt} speed run: {elapsed():.0f} s so far + ~{estimate:.0f} s > budget "
                    f"{A.budget:.0f} s)")
                R[f"{dt}_speed_skipped"] = True
                speed = False
        section(f"{dt} images" + (" + speed" if speed else ""), dtype_section, dt, speed)
    summary()
    save()


if __name__ == "__main__":
    main()
