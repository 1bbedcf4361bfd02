"""One measured process of bench.py: one side (`Ours` or `Diffusers`) in one dtype, then either one generation with
its stages timed (`run_generation`) or UNet forwards between matmuls and the attention kernel alone (`run_unet`).

    python tests/benchmarks/bench_worker.py SPEC_JSON RESULT_FILE   # bench.py's `spawn` writes SPEC_JSON

It imports nothing beyond the standard library before its timers start, and the diffusers side never imports
sld_minimal, so that each process's import time and peak RSS are its side's own.
"""
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's sld_minimal, installed or not

PROMPT = "a photo of a cat sitting on a wooden table, detailed, soft light"
SEED = 0
T = 500  # the timestep of the standalone UNet forwards
# the matmul the UNet's FLOP rate is compared with, (N, N) @ (N, N) in the run's dtype; the smaller one where a
# product of the larger is predicted to take over the budget: without native bf16, PyTorch multiplies bf16 matrices
# in a generic loop kernel, not oneDNN's (0.1 GFLOP/s at 2048² on a Zen 1 EPYC: 162 s per product)
MATMUL_N, MATMUL_SMALL_N, MATMUL_BUDGET_S = 2048, 512, 5.0
# our sampler name (sld_minimal.schedulers.SAMPLERS) -> diffusers' scheduler class and the options that make it ours
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def latent_factor(weights) -> int:
    """Pixels per latent pixel: 2^(levels − 1) of the VAE's config.json (8 for SD 1.x, 2 for the tiny model)."""
    return 2 ** (len(json.loads((Path(weights) / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


class Ours:
    """sld_minimal as users run it: `StableDiffusion.from_pretrained`, which applies `sld_minimal.speedups`."""

    def imports(self):  # timed apart from the load; from_pretrained would import transformers for CLIP's tokenizer
        from transformers import CLIPTokenizer  # noqa: F401
        from sld_minimal.pipeline import StableDiffusion  # noqa: F401

    def load(self, a, dtype):
        from sld_minimal.pipeline import StableDiffusion

        pipe = StableDiffusion.from_pretrained(a.weights, device=a.device, dtype=dtype,
                                               vae_dtype="fp32" if a.vae_fp32 else None)
        return pipe.compile() if a.compile else pipe

    def generate(self, pipe, a):
        from sld_minimal.guidance import PRESETS

        return pipe(PROMPT, safety=PRESETS.get(a.safety), num_inference_steps=a.steps, height=a.size, width=a.size,
                    seed=SEED, scheduler=a.scheduler, progress=False).images[0]  # safety None: "off"

    def load_unet(self, a, dtype):
        """(config, forward(x, t, ctx)): the UNet alone, with the speed-ups that from_pretrained applies."""
        import torch
        from sld_minimal import speedups
        from sld_minimal.diffusers_folder import load_component

        unet = speedups.apply(load_component(a.weights, "unet", a.device, dtype))
        run = torch.compile(unet) if a.compile else unet
        return unet.config, lambda x, t, c: run(x, t, c)


class Diffusers:
    """diffusers' StableDiffusionPipelineSafe as recommended: accelerate installed, so `low_cpu_mem_usage`; our
    sampler's counterpart (`DIFFUSERS_SCHEDULERS`) and our preset's SLD values (`a.sld`) passed explicitly."""

    def imports(self):
        import diffusers  # noqa: F401
        from diffusers import StableDiffusionPipelineSafe  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    def load(self, a, dtype):
        import diffusers
        import torch

        pipe = diffusers.StableDiffusionPipelineSafe.from_pretrained(
            a.weights, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            torch_dtype=dtype).to(a.device)
        if a.vae_fp32:  # diffusers' upcast_vae; the Safe pipeline then hands the VAE half latents: cast them
            pipe.vae.to(torch.float32)
            pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        name, options = DIFFUSERS_SCHEDULERS[a.scheduler]  # built from the folder's scheduler_config.json, as ours
        pipe.scheduler = getattr(diffusers, name).from_pretrained(a.weights, subfolder="scheduler", **options)
        pipe.set_progress_bar_config(disable=True)
        pipe.safety_concept = a.sld.get("safety_concept", pipe.safety_concept)
        return pipe

    def generate(self, pipe, a):
        import torch

        sld = {k: v for k, v in a.sld.items() if k != "safety_concept"}
        return pipe(PROMPT, num_inference_steps=a.steps, height=a.size, width=a.size, output_type="np",
                    generator=torch.Generator().manual_seed(SEED), **sld).images[0]

    def load_unet(self, a, dtype):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(a.weights, subfolder="unet", torch_dtype=dtype).to(a.device).eval()
        return unet.config, lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample


SIDES = {"ours": Ours, "diffusers": Diffusers}


def usage() -> tuple:
    """(peak RSS in GiB, minor page faults, system CPU seconds) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_maxrss * 1024 / 2**30, r.ru_minflt, r.ru_stime  # ru_maxrss is in KiB on Linux


def setup_torch(a):
    """(torch, the run's dtype, sync, timed(fn) -> seconds), torch's threads set."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    return torch, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype], sync, timed


def hook_timer(calls: list, sync, first, last=None, label=lambda args: None):
    """Append (label(args), seconds) to `calls` for every call, from `first`'s pre-hook to `last`'s hook."""
    start = []

    def pre(module, args):
        sync()
        start.append((time.perf_counter(), label(args)))

    def post(module, args, output):
        sync()
        t0, name = start.pop()
        calls.append((name, time.perf_counter() - t0))
    first.register_forward_pre_hook(pre)
    (last or first).register_forward_hook(post)


def run_generation(a, side) -> dict:
    """Import, load, then one generation with its stages timed by hooks on the modules both sides run: the text
    encoder, the UNet (by batch size) and the VAE decode (`post_quant_conv` to `decoder`)."""
    t0 = time.perf_counter()
    torch, dtype, sync, _ = setup_torch(a)
    side.imports()
    import_s, t0 = time.perf_counter() - t0, time.perf_counter()
    pipe = side.load(a, dtype)
    sync()
    load_s, (load_rss, faults, sys_s) = time.perf_counter() - t0, usage()
    text, unet, vae = [], [], []
    hook_timer(text, sync, pipe.text_encoder)
    hook_timer(unet, sync, pipe.unet, label=lambda args: str(args[0].shape[0]))
    hook_timer(vae, sync, pipe.vae.post_quant_conv, pipe.vae.decoder)
    t0 = time.perf_counter()
    image = side.generate(pipe, a)
    sync()
    generation_s, (peak_rss, faults_end, sys_end) = time.perf_counter() - t0, usage()
    if a.image_out:
        import numpy as np

        np.save(a.image_out, np.asarray(image, dtype=np.float32))
    unet_by_batch = {b: [s for k, s in unet if k == b] for b in sorted({k for k, _ in unet}, key=int)}
    return {"import_s": import_s, "load_s": load_s, "generation_s": generation_s, "text_s": sum(s for _, s in text),
            "text_calls": len(text), "unet_s": unet_by_batch, "vae_s": sum(s for _, s in vae),
            "load_rss_gib": load_rss, "peak_rss_gib": peak_rss,
            "faults_k": (faults_end - faults) / 1e3, "sys_s": sys_end - sys_s, "versions": versions()}


def matmul_size(torch, device, dtype, timed) -> int:
    """MATMUL_N, or MATMUL_SMALL_N where a product of that size predicts (n³) more than MATMUL_BUDGET_S for one."""
    m = torch.randn(MATMUL_SMALL_N, MATMUL_SMALL_N).to(device, dtype)
    timed(lambda: m @ m)  # warm-up
    return MATMUL_N if timed(lambda: m @ m) * (MATMUL_N / MATMUL_SMALL_N)**3 <= MATMUL_BUDGET_S else MATMUL_SMALL_N


def run_unet(a, side) -> dict:
    """The UNet alone: forwards at (3, 4, size/f, size/f), five matmuls in the same dtype before and after each, the
    minor page faults of each forward; then the attention kernel alone at the forward's shapes."""
    torch, dtype, sync, timed = setup_torch(a)
    lat = a.size // latent_factor(a.weights)
    cfg, forward = side.load_unet(a, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.in_channels, lat, lat, generator=g).to(a.device, dtype)
    ctx = torch.randn(3, 77, cfg.cross_attention_dim, generator=g).to(a.device, dtype)
    n = matmul_size(torch, a.device, dtype, timed)
    m1, m2 = (torch.randn(n, n, generator=g).to(a.device, dtype) for _ in range(2))
    unet_s, matmul_s, faults = [], [], []
    with torch.no_grad():
        timed(lambda: forward(x, T, ctx))  # warm-up: first-call allocations and kernel selection
        timed(lambda: m1 @ m2)
        for _ in range(a.unet_calls):
            matmul_s += [timed(lambda: m1 @ m2) for _ in range(5)]
            f0 = usage()[1]
            unet_s.append(timed(lambda: forward(x, T, ctx)))
            faults.append(usage()[1] - f0)
        matmul_s += [timed(lambda: m1 @ m2) for _ in range(5)]
        attention_s = time_attention(cfg, lat, a.device, dtype, timed)
    return {"unet_call_s": unet_s, "matmul_s": matmul_s, "matmul_n": n, "attention_s": attention_s,
            "matmul_dtype": str(m1.dtype).removeprefix("torch."), "faults": faults, "peak_rss_gib": usage()[0],
            "versions": versions()}


def attention_calls(cfg, batch, h, w, n_text) -> list:
    """The UNet's attention products at latent (h, w), as (calls, B, heads, N_q, N_kv, C) with heads·d = C: each
    spatial transformer has a self-attention (N_kv = N_q = h·w at its level) and a cross-attention (N_kv = the
    n_text tokens); SD 1.x's `attention_head_dim` is the number of heads (see unet.UNetConfig)."""
    sizes = []
    for _ in cfg.down_block_types:  # the (h, w) of every level, as the down path halves it
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1
    down = [(cfg.layers_per_block if k.startswith("CrossAttn") else 0) for k in cfg.down_block_types]
    up = [(cfg.layers_per_block + 1 if k.startswith("CrossAttn") else 0) for k in cfg.up_block_types][::-1]
    levels = [(d + u, hl * wl, c) for d, u, (hl, wl), c in zip(down, up, sizes, cfg.block_out_channels)]
    levels.append((1, sizes[-1][0] * sizes[-1][1], cfg.block_out_channels[-1]))  # the mid block's transformer
    return [(n, batch, cfg.attention_head_dim, hw, kv, c) for n, hw, c in levels if n for kv in (hw, n_text)]


def time_attention(cfg, lat: int, device, dtype, timed) -> float:
    """Seconds of one forward's attention alone: F.scaled_dot_product_attention, the kernel both sides call, on
    contiguous random inputs (its fastest case) at every shape of `attention_calls`, median of 3 after a warm-up."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    for n, b, heads, nq, nkv, c in attention_calls(cfg, 3, lat, lat, 77):
        q, k, v = (torch.randn(b, heads, m, c // heads, device=device, dtype=dtype) for m in (nq, nkv, nkv))
        timed(lambda: F.scaled_dot_product_attention(q, k, v))
        total += n * sorted(timed(lambda: F.scaled_dot_product_attention(q, k, v)) for _ in range(3))[1]
    return total


def versions() -> dict:
    import importlib.metadata as md

    found = {(d.metadata["Name"] or "").lower(): d.version for d in md.distributions()}
    return {pkg: found.get(pkg) for pkg in ("torch", "diffusers", "transformers", "accelerate", "safetensors")}


if __name__ == "__main__":
    spec = SimpleNamespace(**json.loads(sys.argv[1]))
    run = run_generation if spec.part == "generation" else run_unet
    Path(sys.argv[2]).write_text(json.dumps(run(spec, SIDES[spec.side]())))
