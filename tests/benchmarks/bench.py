"""Speed and memory of sld_minimal against diffusers' StableDiffusionPipelineSafe, on the same weights, side by side.

    # full-size SD 1.4 weights with random values (~4.3 GB, written once if absent; real weights work the same),
    # or write them with `sld-minimal tiny /tmp/sd14_random --config sd14`; then, as in README's performance table:
    python tests/benchmarks/bench.py --write-random /tmp/sd14_random --only unet --runs 1
    # 256 px: fp32 and bf16 side by side, each against diffusers in the same dtype (generation and UNet forward)
    python tests/benchmarks/bench.py --weights /tmp/sd14_random --vs-diffusers --dtype fp32,bf16 --size 256 --steps 10 --safety strong --runs 2
    # 512 px, SD 1.4's own size: a short SLD generation and the UNet forward
    python tests/benchmarks/bench.py --weights /tmp/sd14_random --vs-diffusers --dtype fp32,bf16 --size 512 --steps 4 --safety strong --runs 1

What is measured, and how:

* Every generation runs in a fresh subprocess (load, one generation, exit), so that peak RSS — the per-process
  high-water mark `getrusage(RUSAGE_SELF).ru_maxrss` — belongs to one side and one dtype only. With
  `--vs-diffusers` the subprocesses alternate ours / diffusers / diffusers / ours / … (ABBA) over `--runs` runs
  within each dtype, both sides in the same dtype; with several dtypes (`--dtype fp32,bf16`) run i of every dtype
  comes before run i+1 of any, so that drift in the machine's load hits every column alike. Tables show medians.
* The stages are timed the same way on both sides, by forward hooks on the modules: text encoder (all calls of one
  generation, summed), UNet (per call, median, by batch size), VAE decode (pre-hook on `post_quant_conv`, hook on
  `decoder`: both sides run exactly these two). "generation" is the whole pipeline call, including scheduler and
  guidance arithmetic; "load" is `from_pretrained` (imports, transformers included on both sides, are timed
  apart). The weight files are read once before the first run, so every run loads from the page cache. diffusers
  maps the safetensors files (zero-copy: pages of weights are read in at their first use, inside generation); ours
  reads every tensor into fresh, aligned memory at load (`weights.read_tensors`: results must not depend on where a
  file puts a tensor), so its load includes that copy and its generation does not.
* Page faults and system time show memory churn: glibc gives every allocation above its mmap threshold (at most
  32 MiB) fresh pages and returns them on free, so large temporaries (activations at 256+ px, oneDNN's weight
  reorders) are paid in page faults on every call. `--env MALLOC_MMAP_THRESHOLD_=4294967296
  --env MALLOC_TRIM_THRESHOLD_=4294967296` removes that for both sides, to see the compute alone.
* diffusers is loaded as recommended: `StableDiffusionPipelineSafe.from_pretrained(DIR, safety_checker=None,
  feature_extractor=None, requires_safety_checker=False, torch_dtype=…)` with `accelerate` installed, so that
  `low_cpu_mem_usage` is on (modules built empty, then given the file's tensors). Its scheduler is the class that
  implements our `--scheduler` (`DIFFUSERS_SCHEDULERS`: ddim → DDIMScheduler, pndm → PNDMScheduler, dpmpp2m →
  DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2, euler → EulerDiscreteScheduler),
  built from the folder's scheduler_config.json as ours is. The SLD values are passed explicitly
  (`sld_guidance_scale`, `sld_warmup_steps`, `sld_threshold`, `sld_momentum_scale`, `sld_mom_beta`) from our preset
  table, so both sides compute the same image; the table gives the largest pixel difference of the first runs (in
  fp32 it is rounding; in bf16/fp16 diffusers keeps the latents and the guidance in the model's dtype, ours in fp32,
  so the images differ by that rounding). `--scheduler` takes every name of `sld_minimal.schedulers.SAMPLERS`,
  `--safety` every SLD preset of `sld_minimal.methods.PRESETS` (the `sega-*` presets are SEGA, which diffusers'
  Safe pipeline does not run).
* Precision: `--dtype` is the text encoder's and the UNet's dtype on both sides, and the VAE's unless `--vae-fp32`
  (each table heading says which). bf16 on the CPU is fast only where the CPU has it natively (AVX512-BF16 or AMX:
  the report says whether this one does, from /proc/cpuinfo's flags); elsewhere oneDNN emulates it. fp16 on the
  CPU is refused (PyTorch has no fast CPU fp16 path; ours refuses it too).
* UNet efficiency: FLOPs of one UNet forward at `--size`, batch 3, counted with `torch.utils.flop_counter`
  (convolutions and matmuls, on the meta device) plus attention's 4·B·heads·N_q·N_kv·d, which the counter does not
  see on CPU, computed from the config; divided by the measured time per forward, and compared with this machine's
  matmul rate in the dtype of the run (2048×2048 @ 2048×2048 in bf16 for a bf16 run, fp32 for fp32; five products
  before and after every UNet forward, median of all), measured in the same subprocess. "page faults / call" counts
  the minor faults of one forward. The latent size is `--size` over the VAE's factor, 2^(levels − 1) from its
  config.json (8 for SD 1.x).
* What attention allows: both sides compute attention with `F.scaled_dot_product_attention` (on the CPU, PyTorch's
  flash kernel, which the code around it can hardly speed up). "attention alone" times that call, on contiguous
  inputs (its fastest case), at every shape of one forward (`attention_calls`), in the same subprocess; "ceiling"
  is the fraction of the matmul rate the forward would reach if its convolutions and matmuls ran at the matmul
  rate and nothing else took any time. It is a guide, not a hard bound: large 3×3 convolutions can run faster
  than the 2048² matmul (`profile_unet.py` gives the rate of every convolution and linear layer shape).
* Targets (`TARGETS`): each applies where the run's settings match it (size, steps, safety, dtypes, and
  `--vs-diffusers` for a ratio to diffusers), and prints met or MISSED. The bf16 targets are for CPUs with native
  bf16.

Options: `--only generation|unet` runs one part; `--threads N` sets torch's threads; `--dtype fp16 --device cuda`
for a GPU. Run on a quiet machine: other processes on the same cores make every number noisy.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's sld_minimal, installed or not

PROMPT = "a photo of a cat sitting on a wooden table, detailed, soft light"
SEED = 0
T = 500  # the timestep of the standalone UNet forwards
MATMUL_N = 2048
DTYPES = ("fp32", "bf16", "fp16")  # what --dtype takes (a comma list of these)
# our sampler name (sld_minimal.schedulers.SAMPLERS) -> diffusers' scheduler class and the options that make it ours
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def latent_factor(weights) -> int:
    """Pixels per latent pixel: 2^(levels − 1) of the VAE (8 for SD 1.x, 2 for the tiny test model)."""
    cfg = json.loads((Path(weights) / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


# ================================================================ subprocess side: one load and one generation

class StageTimer:
    """Wall-clock durations of module calls, taken by forward hooks; `sync` waits for the device first."""

    def __init__(self, sync):
        self.sync, self.calls, self._start = sync, defaultdict(list), {}

    def attach(self, name, first, last=None, batch_of=None):
        """Time from `first`'s pre-hook to `last`'s (default `first`) hook; `batch_of(args)` labels each call."""
        def pre(module, args):
            self.sync()
            self._start[name] = (time.perf_counter(), batch_of(args) if batch_of else None)

        def post(module, args, output):
            self.sync()
            t0, batch = self._start.pop(name)
            self.calls[name].append((batch, time.perf_counter() - t0))

        first.register_forward_pre_hook(pre)
        (last or first).register_forward_hook(post)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux


def page_faults() -> int:
    """Minor page faults so far: each first touch of freshly mapped memory. glibc maps every allocation above its
    mmap threshold (at most 32 MiB) afresh and unmaps it on free, so large temporaries cost faults every time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def setup_torch(a):
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    return torch, dtype, sync


def run_generation(a) -> dict:
    """Import, load, one generation with the stages timed; returns the numbers and where the image was saved."""
    t0 = time.perf_counter()
    torch, dtype, sync = setup_torch(a)
    from sld_minimal.methods import safety_configs

    configs = safety_configs(a.safety)  # [] for "off", [SafetyConfig] for an SLD preset
    safety = configs[0] if configs else None
    if a.side == "ours":
        from transformers import CLIPTokenizer  # noqa: F401  (from_pretrained would import it: timed as import)

        from sld_minimal.pipeline import StableDiffusion
    else:
        import diffusers
        from diffusers import StableDiffusionPipelineSafe
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401  (imported here, not during the load)

        scheduler_name, scheduler_options = DIFFUSERS_SCHEDULERS[a.scheduler]
        scheduler_cls = getattr(diffusers, scheduler_name)
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if a.side == "ours":
        kw = {"vae_dtype": torch.float32} if a.vae_fp32 else {}
        pipe = StableDiffusion.from_pretrained(a.weights, device=a.device, dtype=dtype, **kw)
        if a.compile:
            pipe.compile()
        text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    else:
        pipe = StableDiffusionPipelineSafe.from_pretrained(
            a.weights, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            torch_dtype=dtype).to(a.device)
        if a.vae_fp32:  # diffusers' upcast_vae; the Safe pipeline then hands the VAE half latents: cast them
            pipe.vae.to(torch.float32)
            pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        # our sampler's counterpart, built from the folder's scheduler_config.json as ours is (whatever class the
        # folder names: SD 1.4's is PNDM); checked on the tiny model: max |Δpixel| ~3e-7 for each of the four
        pipe.scheduler = scheduler_cls.from_pretrained(a.weights, subfolder="scheduler", **scheduler_options)
        pipe.set_progress_bar_config(disable=True)
        if safety is not None:
            pipe.safety_concept = safety.concept
        text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    sync()
    load_s = time.perf_counter() - t0
    load_rss = peak_rss_gib()

    timer = StageTimer(sync)
    faults, sys_s = page_faults(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    timer.attach("text", text_encoder)
    timer.attach("unet", unet, batch_of=lambda args: int(args[0].shape[0]))
    timer.attach("vae", vae.post_quant_conv, vae.decoder)

    t0 = time.perf_counter()
    if a.side == "ours":
        out = pipe(PROMPT, safety=safety, num_inference_steps=a.steps, height=a.size, width=a.size, seed=SEED,
                   scheduler=a.scheduler, progress=False)
        image = out.images[0]
    else:
        sld = {"sld_guidance_scale": 0.0} if safety is None else {
            "sld_guidance_scale": safety.scale, "sld_warmup_steps": safety.warmup_steps,
            "sld_threshold": safety.threshold, "sld_momentum_scale": safety.momentum_scale,
            "sld_mom_beta": safety.momentum_beta}
        image = pipe(PROMPT, num_inference_steps=a.steps, height=a.size, width=a.size, output_type="np",
                     generator=torch.Generator().manual_seed(SEED), **sld).images[0]
    sync()
    generation_s = time.perf_counter() - t0

    unet_by_batch = defaultdict(list)
    for batch, s in timer.calls["unet"]:
        unet_by_batch[batch].append(s)
    if a.image_out:
        import numpy as np

        np.save(a.image_out, np.asarray(image, dtype=np.float32))
    return {"import_s": import_s, "load_s": load_s, "generation_s": generation_s,
            "text_s": sum(s for _, s in timer.calls["text"]), "text_calls": len(timer.calls["text"]),
            "unet_s": {str(b): v for b, v in sorted(unet_by_batch.items())},
            "vae_s": sum(s for _, s in timer.calls["vae"]),
            "load_rss_gib": load_rss, "peak_rss_gib": peak_rss_gib(), "faults_k": (page_faults() - faults) / 1e3,
            "sys_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_s, "versions": versions()}


def run_unet(a) -> dict:
    """Only the UNet: forwards at (3, 4, size/f, size/f) (f: the VAE's factor) interleaved with 2048² matmuls in the
    same dtype, both timed."""
    torch, dtype, sync = setup_torch(a)
    lat = a.size // latent_factor(a.weights)
    if a.side == "ours":
        from sld_minimal.diffusers_folder import load_component

        unet = load_component(a.weights, "unet", a.device, dtype)
        if a.compile:
            unet = torch.compile(unet)
        forward = lambda x, t, c: unet(x, t, c)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(a.weights, subfolder="unet", torch_dtype=dtype).to(a.device).eval()
        forward = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.in_channels, lat, lat, generator=g).to(a.device, dtype)
    ctx = torch.randn(3, 77, cfg.cross_attention_dim, generator=g).to(a.device, dtype)
    # the matmul rate in the run's dtype: a bf16 UNet is compared with what a bf16 matmul reaches on this machine
    m1, m2 = (torch.randn(MATMUL_N, MATMUL_N, generator=g).to(a.device, dtype) for _ in range(2))

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    unet_s, matmul_s, faults = [], [], []
    with torch.no_grad():
        timed(lambda: forward(x, T, ctx))  # warm-up: first-call allocations and kernel selection
        timed(lambda: m1 @ m2)
        for _ in range(a.unet_calls):
            matmul_s += [timed(lambda: m1 @ m2) for _ in range(5)]
            f0 = page_faults()
            unet_s.append(timed(lambda: forward(x, T, ctx)))
            faults.append(page_faults() - f0)
        matmul_s += [timed(lambda: m1 @ m2) for _ in range(5)]
        attention_s = time_attention(cfg, lat, a.device, dtype, timed)
    return {"unet_call_s": unet_s, "matmul_s": matmul_s, "matmul_dtype": str(m1.dtype).removeprefix("torch."),
            "attention_s": attention_s, "faults": faults, "peak_rss_gib": peak_rss_gib(), "versions": versions()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ================================================================ FLOPs, from the config (no weights, no time)

def unet_flops(weights: Path, size: int) -> dict:
    """GFLOP of one UNet forward at (3, 4, size/f, size/f) (f: the VAE's factor): convolutions and matmuls counted
    by FlopCounterMode on the meta device, and attention's QKᵀ and AV products computed from the config."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sld_minimal.unet import UNet2DConditionModel

    cfg = read_unet_config(weights)
    h = w = size // latent_factor(weights)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg)
        x, ctx = torch.empty(3, cfg.in_channels, h, w), torch.empty(3, 77, cfg.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor(T), ctx)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # On meta, attention may be decomposed into bmm's (or counted as an SDPA op): those are replaced by the formula.
    attention_ops = [op for op in by_op if "bmm" in op or "attention" in op]
    conv_linear = sum(n for op, n in by_op.items() if op not in attention_ops)
    attention = attention_flops(cfg, 3, h, w, 77)
    return {"conv_linear": conv_linear / 1e9, "attention": attention / 1e9,
            "attention_seen_by_counter": sum(by_op[op] for op in attention_ops) / 1e9,
            "total": (conv_linear + attention) / 1e9}


def read_unet_config(weights: Path):
    from sld_minimal.unet import UNetConfig
    from sld_minimal.weights import read_config

    return read_config(UNetConfig, weights / "unet" / "config.json")


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
    heads = cfg.attention_head_dim
    return [(n, batch, heads, hw, kv, c) for n, hw, c in levels if n for kv in (hw, n_text)]


def attention_flops(cfg, batch, h, w, n_text) -> int:
    """Σ over attention calls of 4·B·N_q·N_kv·C (QKᵀ and AV, 2 FLOPs per multiply-add)."""
    return sum(n * 4 * b * nq * nkv * c for n, b, _, nq, nkv, c in attention_calls(cfg, batch, h, w, n_text))


def time_attention(cfg, lat: int, device, dtype, timed) -> float:
    """Seconds of one UNet forward's attention alone: F.scaled_dot_product_attention, the kernel that both sides
    call, at every shape of `attention_calls` (random q, k, v; median of 3 after a warm-up) times its calls."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    for n, b, heads, nq, nkv, c in attention_calls(cfg, 3, lat, lat, 77):
        q = torch.randn(b, heads, nq, c // heads, device=device, dtype=dtype)
        k, v = (torch.randn(b, heads, nkv, c // heads, device=device, dtype=dtype) for _ in range(2))
        timed(lambda: F.scaled_dot_product_attention(q, k, v))
        total += n * sorted(timed(lambda: F.scaled_dot_product_attention(q, k, v)) for _ in range(3))[1]
    return total


# ================================================================ the orchestrator

def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, native bf16: {native_bf16()}"


def native_bf16() -> str:
    """Whether the CPU computes bf16 natively ("yes (avx512_bf16, amx_bf16)"), from /proc/cpuinfo's flags; without
    these oneDNN emulates bf16 in fp32 units, and the bf16 targets do not apply."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"yes ({', '.join(found)})" if found else "no (emulated)"


def warm_page_cache(weights: Path):
    """Read every file once so that all runs, ours and theirs, load from memory rather than the disk."""
    for p in sorted(weights.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def spawn(a, side: str, mode: str, dtype: str, image_out=None) -> dict:
    """One subprocess running `mode` for `side` in `dtype`; its result comes back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", mode, "--side", side, "--result", str(result),
               "--weights", str(a.weights), "--size", str(a.size), "--steps", str(a.steps), "--safety", a.safety,
               "--scheduler", a.scheduler, "--dtype", dtype, "--device", a.device,
               "--unet-calls", str(a.unet_calls)]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        cmd += ["--image-out", str(image_out)] if image_out else []
        cmd += ["--compile"] if a.compile and side == "ours" else []
        cmd += ["--vae-fp32"] if a.vae_fp32 else []
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **dict(e.split("=", 1) for e in a.env))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            sys.exit(f"the {side} {mode} subprocess ({dtype}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def order(runs: int, sides: list, dtypes: list) -> list:
    """(side, dtype) in ABBA order within each dtype: ours, theirs, theirs, ours, … so that a slow drift of the
    machine does not favour either side; run i of every dtype before run i+1 of any, so it favours no dtype."""
    out = []
    for i in range(runs):
        for d in dtypes:
            out += [(side, d) for side in (sides if i % 2 == 0 else sides[::-1])]
    return out


def med(values):
    return statistics.median(values) if values else float("nan")


def summarize(results: list) -> dict:
    """Medians over the runs of one side."""
    s = {k: med([r[k] for r in results]) for k in ("import_s", "load_s", "generation_s", "text_s", "vae_s",
                                                    "peak_rss_gib", "load_rss_gib", "faults_k", "sys_s")}
    s["load_generation_s"] = med([r["load_s"] + r["generation_s"] for r in results])
    s["import_load_s"] = med([r["import_s"] + r["load_s"] for r in results])
    s["import_load_generation_s"] = med([r["import_s"] + r["load_s"] + r["generation_s"] for r in results])
    s["unet_total_s"] = med([sum(sum(v) for v in r["unet_s"].values()) for r in results])
    s["rest_s"] = med([r["generation_s"] - r["text_s"] - r["vae_s"] - sum(sum(v) for v in r["unet_s"].values())
                       for r in results])
    s["text_calls"] = results[0]["text_calls"]
    for batch in results[0]["unet_s"]:
        s[f"unet_b{batch}_s"] = med([t for r in results for t in r["unet_s"][batch]])
        s[f"unet_b{batch}_calls"] = len(results[0]["unet_s"][batch])
    return s


def fmt(v, unit=""):
    if v is None or v != v:
        return "–"
    return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"



def vae_dtype(a, dtype: str) -> str:
    return "fp32" if a.vae_fp32 else dtype


def generation_report(a, dtype: str, ours: dict, ref: dict | None, image_diff) -> list:
    rows = [("import (s)", "import_s"), ("**load (s)**", "load_s"), ("import + load (s)", "import_load_s"),
            ("text encoding (s, all calls)", "text_s")]
    batches = sorted({k for s in (ours, ref or {}) for k in s if k.startswith("unet_b") and k.endswith("_s")})
    for k in batches:
        b = k[len("unet_b"):-2]
        rows.append((f"UNet call, batch {b} (s, median)", k))
    rows += [("UNet, all calls (s)", "unet_total_s"), ("VAE decode (s)", "vae_s"),
             ("rest: scheduler, guidance, Python (s)", "rest_s"), ("**generation (s)**", "generation_s"),
             ("**load + generation (s)**", "load_generation_s"),
             ("import + load + generation (s)", "import_load_generation_s"),
             ("peak RSS after load (GiB)", "load_rss_gib"), ("**peak RSS (GiB)**", "peak_rss_gib"),
             ("minor page faults during generation (thousands)", "faults_k"),
             ("system CPU time during generation (s)", "sys_s")]
    what = (f"Generation, {a.size}×{a.size} px, {a.steps} steps, SLD {a.safety}, {a.scheduler}, {dtype} "
            f"(VAE {vae_dtype(a, dtype)})")
    head = f"| {what} | sld_minimal | diffusers | ours / diffusers |\n|---|---:|---:|---:|" if ref else \
        f"| {what} | sld_minimal |\n|---|---:|"
    lines = [head]
    for label, key in rows:
        o, r = ours.get(key), (ref or {}).get(key)
        if ref:
            ratio = o / r if o is not None and r not in (None, 0) and r == r else None
            lines.append(f"| {label} | {fmt(o)} | {fmt(r)} | {fmt(ratio)} |")
        else:
            lines.append(f"| {label} | {fmt(o)} |")
    calls = ", ".join(f"{ours[k]} at batch {k[6:-6]}" for k in ours if k.endswith("_calls") and k.startswith("unet_b"))
    notes = [f"UNet calls per generation, ours: {calls}"]
    if ref:
        calls = ", ".join(f"{ref[k]} at batch {k[6:-6]}" for k in ref if k.endswith("_calls") and k.startswith("unet_b"))
        notes.append(f"diffusers: {calls}")
    if image_diff is not None:
        why = "" if dtype == "fp32" else " (diffusers keeps latents and guidance in " + dtype + ", ours in fp32)"
        notes.append(f"images of the first runs: max |Δpixel| = {image_diff:.2e} (in [0, 1]){why}")
    return lines + ["", "; ".join(notes) + "."]


def unet_stats(flops: dict, results: list) -> dict:
    """Medians over the runs of one side and dtype in the UNet part."""
    unet_s = med([t for r in results for t in r["unet_call_s"]])
    matmul = med([2 * MATMUL_N**3 / t / 1e9 for r in results for t in r["matmul_s"]])
    achieved = flops["total"] / unet_s
    attention_s = med([r["attention_s"] for r in results])
    # the fraction this UNet would reach if all but its attention ran at the matmul rate and took no other time
    ceiling = flops["total"] / (flops["conv_linear"] / matmul + attention_s) / matmul
    return {"unet_call_s": unet_s, "gflops": achieved, "matmul_gflops": matmul, "fraction": achieved / matmul,
            "attention_s": attention_s, "ceiling": ceiling,
            "faults_k": med([f for r in results for f in r["faults"]]) / 1e3,
            "peak_rss_gib": med([r["peak_rss_gib"] for r in results]), "matmul_dtype": results[0]["matmul_dtype"],
            "matmuls_per_run": len(results[0]["matmul_s"])}


def unet_report(a, dtype: str, flops: dict, ours: dict, ref: dict | None) -> list:
    lat = a.size // latent_factor(a.weights)
    mm = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(ours["matmul_dtype"], ours["matmul_dtype"])
    sides = [("sld_minimal", ours)] + ([("diffusers", ref)] if ref else [])
    lines = [f"| UNet forward, batch 3, {a.size}×{a.size} px ({lat}×{lat} latent), {dtype} | s / call | GFLOP/s "
             f"| {mm} matmul GFLOP/s | fraction of the {mm} matmul rate | attention alone (s) | ceiling "
             f"| page faults / call (k) | peak RSS (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, st in sides:
        lines.append(f"| {name} | {fmt(st['unet_call_s'])} | {st['gflops']:.1f} | {st['matmul_gflops']:.1f} | "
                     f"**{st['fraction']:.0%}** | {fmt(st['attention_s'])} | {st['ceiling']:.0%} | "
                     f"{st['faults_k']:.0f} | {fmt(st['peak_rss_gib'])} |")
    if ref:
        lines.append(f"| ours / diffusers | {ours['unet_call_s'] / ref['unet_call_s']:.3f} | | | | | | | "
                     f"{ours['peak_rss_gib'] / ref['peak_rss_gib']:.3f} |")
    lines += ["", f"FLOPs per forward: {flops['total']:.1f} GFLOP = {flops['conv_linear']:.1f} convolutions and "
              f"matmuls (torch FlopCounterMode) + {flops['attention']:.1f} attention (4·B·N_q·N_kv·C, analytic; "
              f"the counter saw {flops['attention_seen_by_counter']:.1f} of it on the meta device). Matmul rate: {mm} "
              f"{MATMUL_N}×{MATMUL_N} @ {MATMUL_N}×{MATMUL_N}, median of {ours['matmuls_per_run']} per run, "
              f"measured in the same subprocess between the UNet calls ({a.unet_calls} timed calls per run "
              f"after one warm-up). Attention alone: F.scaled_dot_product_attention at the forward's attention "
              f"shapes, timed in the same subprocess; ceiling: the fraction the forward would reach if its "
              f"convolutions and matmuls ran at the matmul rate and nothing else took time, "
              f"FLOPs / (conv_linear / matmul rate + attention alone) / matmul rate. Peak RSS: the UNet-only "
              f"subprocess (load, the forwards and the matmuls)."]
    return lines


def cross_report(a, dtypes: list, gen: dict, unet: dict) -> list:
    """All dtypes side by side: each side's figure per dtype, then ours in each dtype against diffusers in fp32
    (what a CPU user runs by default) and in the same dtype, and ours against ours in fp32."""
    vs = a.vs_diffusers
    cols = [(side, d) for d in dtypes for side in (["ours", "diffusers"] if vs else ["ours"])]
    ratios = []  # (label, (side, dtype) numerator, (side, dtype) denominator)
    for d in dtypes:
        if d == "fp32":
            continue
        if vs and "fp32" in dtypes:
            ratios.append((f"ours-{d} / diffusers-fp32", ("ours", d), ("diffusers", "fp32")))
        if vs:
            ratios.append((f"ours-{d} / diffusers-{d}", ("ours", d), ("diffusers", d)))
        if "fp32" in dtypes:
            ratios.append((f"ours-{d} / ours-fp32", ("ours", d), ("ours", "fp32")))
    rows = []  # (label, part, key)
    if gen:
        b = max((k for k in gen[dtypes[0]]["ours"] if k.startswith("unet_b") and k.endswith("_s")),
                key=lambda k: int(k[len("unet_b"):-2]), default=None)
        rows += [(f"generation, {a.steps} steps, SLD {a.safety} (s)", "gen", "generation_s"),
                 ("load + generation (s)", "gen", "load_generation_s")]
        rows += [(f"UNet call in generation, batch {b[len('unet_b'):-2]} (s)", "gen", b)] if b else []
        rows += [("VAE decode (s)", "gen", "vae_s"), ("peak RSS, generation (GiB)", "gen", "peak_rss_gib")]
    if unet:
        rows += [("UNet forward, batch 3 (s, UNet part)", "unet", "unet_call_s"),
                 ("UNet, fraction of the same dtype's matmul rate", "unet", "fraction"),
                 ("UNet, ceiling with this attention kernel (see the UNet table)", "unet", "ceiling"),
                 ("peak RSS, UNet part (GiB)", "unet", "peak_rss_gib")]

    def value(part, key, side, d):
        table = gen if part == "gen" else unet
        st = table.get(d, {}).get(side)
        return None if st is None else st.get(key)

    name = {"ours": "ours", "diffusers": "diffusers"}
    vae = "; VAE fp32" if a.vae_fp32 else ""
    lines = [f"| {a.size}×{a.size} px, {' and '.join(dtypes)} side by side{vae} | "
             + " | ".join(f"{name[s]} {d}" for s, d in cols) + "".join(f" | {r[0]}" for r in ratios) + " |",
             "|---|" + "---:|" * (len(cols) + len(ratios))]
    for label, part, key in rows:
        share = key in ("fraction", "ceiling")
        cells = [fmt(value(part, key, s, d)) if not share else
                 (f"{value(part, key, s, d):.0%}" if value(part, key, s, d) is not None else "–") for s, d in cols]
        for _, (ns, nd), (ds, dd) in ratios:
            n, m = value(part, key, ns, nd), value(part, key, ds, dd)
            cells.append(fmt(n / m) if n is not None and m not in (None, 0) and not share else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


TARGETS = [
    # (what, part, key, ours' dtype, diffusers' dtype or None for a bound on ours alone, op, bound,
    #  settings where it applies). "*" as ours' dtype: each dtype of the run, against diffusers in the same dtype.
    # Issue 17: bf16 on CPUs with native bf16, peak RSS, 512 px.
    ("UNet forward, ours-bf16 / diffusers-bf16", "unet", "unet_call_s", "bf16", "bf16", "≤", 0.70, {}),
    ("UNet forward, ours-bf16, fraction of the bf16 matmul rate", "unet", "fraction", "bf16", None, "≥", 0.80, {}),
    ("generation, 256 px, 10 steps, SLD strong, ours-bf16 / diffusers-fp32", "generation", "generation_s",
     "bf16", "fp32", "≤", 0.33, {"size": 256, "steps": 10, "safety": "strong"}),
    ("peak RSS, generation, ours / diffusers, {d}", "generation", "peak_rss_gib", "*", "*", "≤", 1.00, {}),
    ("peak RSS, UNet part, ours / diffusers, {d}", "unet", "peak_rss_gib", "*", "*", "≤", 1.00, {}),
    ("UNet forward, 512 px, ours / diffusers, fp32", "unet", "unet_call_s", "fp32", "fp32", "≤", 0.90, {"size": 512}),
    ("generation, 512 px, ours / diffusers, fp32", "generation", "generation_s", "fp32", "fp32", "≤", 0.90,
     {"size": 512}),
    # earlier fp32 targets (the 256 px generation's did not hold on a Zen 5 EPYC: issue 17)
    ("generation, 256 px, 10 steps, SLD strong, ours / diffusers, fp32", "generation", "generation_s", "fp32", "fp32",
     "≤", 0.90, {"size": 256, "steps": 10, "safety": "strong"}),
    ("load + generation, 256 px, 10 steps, SLD strong, ours / diffusers, fp32", "generation", "load_generation_s",
     "fp32", "fp32", "≤", 0.90, {"size": 256, "steps": 10, "safety": "strong"}),
    ("generation, 256 px, 20 steps, SLD weak, ours / diffusers, fp32", "generation", "generation_s", "fp32", "fp32",
     "≤", 0.75, {"size": 256, "steps": 20, "safety": "weak"}),
    ("load, ours / diffusers, {d}", "generation", "load_s", "*", "*", "≤", 1.00, {}),
]


def targets_report(a, dtypes: list, gen: dict, unet: dict) -> list:
    """met / MISSED for every target whose settings match the run; the bf16 ones note a CPU without native bf16."""
    native = native_bf16().startswith("yes") or a.device != "cpu"
    lines = []
    for what, part, key, od, rd, op, bound, where in TARGETS:
        if any(getattr(a, k) != v for k, v in where.items()):
            continue
        table = gen if part == "generation" else unet
        for d in (dtypes if od == "*" else [od]):
            ref_d = d if rd == "*" else rd
            ours = table.get(d, {}).get("ours")
            ref = table.get(ref_d, {}).get("diffusers") if ref_d else None
            if ours is None or (ref_d and ref is None):
                continue
            value = ours[key] / ref[key] if ref_d else ours[key]
            ok = value <= bound if op == "≤" else value >= bound
            note = " (this CPU emulates bf16; the target is for native bf16)" \
                if "bf16" in (d, ref_d) and not native and key not in ("peak_rss_gib", "load_s") else ""
            lines.append(f"| {what.format(d=d)} | {op} {bound:.2f} | {value:.3f} | "
                         f"{'met' if ok else 'MISSED'}{note} |")
    return ["| target | bound | measured | |", "|---|---:|---:|---|"] + lines + [""] if lines else []


def parse_dtypes(text: str) -> list:
    dtypes = []
    for d in (x.strip().lower() for x in text.split(",")):
        if d not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {d!r}: a comma list of {', '.join(DTYPES)}")
        if d not in dtypes:
            dtypes.append(d)
    return dtypes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    worker = "--worker" in argv
    if worker:  # a subprocess: its choices were checked by the orchestrator; importing nothing before its timers
        scheduler_choices = safety_choices = None
    else:
        from sld_minimal.guidance import SafetyConfig
        from sld_minimal.methods import PRESETS, safety_configs
        from sld_minimal.schedulers import SAMPLERS

        scheduler_choices = list(SAMPLERS)
        # SLD presets only: diffusers' StableDiffusionPipelineSafe runs SLD, not SEGA (the sega-* presets)
        safety_choices = [name for name in PRESETS
                          if all(isinstance(c, SafetyConfig) for c in safety_configs(name))]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", type=Path, help="an SD 1.x folder in the published diffusers layout")
    p.add_argument("--write-random", type=Path, metavar="DIR",
                   help="write full-size SD 1.4 random weights to DIR (if absent) and benchmark them")
    p.add_argument("--vs-diffusers", action="store_true", help="run diffusers' StableDiffusionPipelineSafe too")
    p.add_argument("--size", type=int, default=256, help="image height and width in pixels (default 256)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--safety", default="strong", choices=safety_choices,
                   help="an SLD preset of sld_minimal.methods.PRESETS, or off (default strong)")
    p.add_argument("--scheduler", default="pndm", choices=scheduler_choices,
                   help="a sampler of sld_minimal.schedulers.SAMPLERS (default pndm); diffusers runs its counterpart")
    p.add_argument("--runs", type=int, default=3, help="subprocesses per side and dtype (alternating), medians reported")
    p.add_argument("--unet-calls", type=int, default=3, help="timed UNet forwards per run in the UNet part")
    p.add_argument("--only", choices=["generation", "unet"], help="run one part only (default: both)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's, all cores)")
    p.add_argument("--dtype", default="fp32", metavar="fp32,bf16",
                   help="the dtype, or a comma list of them run side by side: fp32, bf16, fp16 (default fp32)")
    p.add_argument("--vae-fp32", action="store_true", help="keep the VAE in fp32 when --dtype is fp16/bf16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="ours with torch.compile (opt-in; compile time is in load)")
    p.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    p.add_argument("--json", type=Path, help="also write every run's raw numbers to this file")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for both sides' subprocesses, e.g. MALLOC_MMAP_THRESHOLD_=4294967296 "
                        "(repeatable; the default runs as users do)")
    # internal: one subprocess's work
    p.add_argument("--worker", choices=["generation", "unet"], help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--image-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        out = run_generation(a) if a.worker == "generation" else run_unet(a)
        a.result.write_text(json.dumps(out))
        return

    try:
        dtypes = parse_dtypes(a.dtype)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.device == "cpu" and "fp16" in dtypes:
        p.error("fp16 is not accelerated on the CPU: use --dtype bf16 or fp32")
    if a.vs_diffusers and a.scheduler not in DIFFUSERS_SCHEDULERS:
        p.error(f"--scheduler {a.scheduler} has no diffusers counterpart in bench.py's DIFFUSERS_SCHEDULERS: "
                f"with --vs-diffusers use one of {', '.join(DIFFUSERS_SCHEDULERS)}")
    if a.write_random:
        if not (a.write_random / "model_index.json").is_file():
            from sld_minimal.testing import tiny

            print(f"writing full-size SD 1.4 random weights to {a.write_random} (~4.3 GB) …", file=sys.stderr)
            tiny.write_checkpoint(a.write_random, "sd14")
        a.weights = a.weights or a.write_random
    if a.weights is None:
        p.error("--weights DIR is required (or --write-random DIR)")
    if a.size % 8 or a.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    if a.vs_diffusers:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            p.error("--vs-diffusers needs `pip install accelerate diffusers`: without accelerate, diffusers "
                    "initialises every weight randomly before loading (not its recommended setup)")

    sides = ["ours", "diffusers"] if a.vs_diffusers else ["ours"]
    print(f"warming the page cache with {a.weights} …", file=sys.stderr)
    warm_page_cache(a.weights)
    title = "sld_minimal vs diffusers" if a.vs_diffusers else "sld_minimal"
    what = "UNet forward" if a.only == "unet" else f"{a.steps} steps, SLD {a.safety}, {a.scheduler}"
    vae = ", VAE fp32" if a.vae_fp32 else ""
    report = [f"### {title}: {a.size}×{a.size} px, {what}, {' and '.join(dtypes)}{vae}, {a.device}", "", "```",
              "python tests/benchmarks/bench.py " + " ".join(argv), "```", "", f"native bf16: {native_bf16()}", ""]
    gen_versions, raw = None, {"args": {k: str(v) for k, v in vars(a).items()}, "dtypes": dtypes}
    gen, unet = {}, {}  # dtype -> {"ours": medians, "diffusers": medians or None}
    image_diff, flops = {}, None  # dtype -> max |Δpixel| of the first runs; the UNet's FLOPs

    if a.only in (None, "generation"):
        results = defaultdict(list)  # (side, dtype) -> runs
        with tempfile.TemporaryDirectory() as tmp:
            image_paths = {}
            for side, d in order(a.runs, sides, dtypes):
                first = (side, d) not in image_paths
                image_paths.setdefault((side, d), Path(tmp) / f"{side}-{d}.npy")
                print(f"run {len(results[side, d]) + 1}/{a.runs}, {d}: {side} …", file=sys.stderr, flush=True)
                r = spawn(a, side, "generation", d, image_paths[side, d] if first else None)
                results[side, d].append(r)
                calls = [t for v in r["unet_s"].values() for t in v]
                print(f"  load {r['load_s']:.2f} s, generation {r['generation_s']:.2f} s (UNet {len(calls)} calls, "
                      f"{min(calls):.2f}–{max(calls):.2f} s each; VAE {r['vae_s']:.2f} s), "
                      f"peak RSS {r['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
            if a.vs_diffusers:
                import numpy as np

                for d in dtypes:
                    image_diff[d] = float(np.abs(np.load(image_paths["ours", d])
                                                 - np.load(image_paths["diffusers", d])).max())
        gen_versions = results["ours", dtypes[0]][0]["versions"]
        raw["generation"] = {f"{side}-{d}": runs for (side, d), runs in results.items()}
        for d in dtypes:
            gen[d] = {"ours": summarize(results["ours", d]),
                      "diffusers": summarize(results["diffusers", d]) if a.vs_diffusers else None}

    if a.only in (None, "unet"):
        flops = unet_flops(a.weights, a.size)
        results = defaultdict(list)
        for side, d in order(a.runs, sides, dtypes):
            print(f"UNet forwards, {d}: {side} …", file=sys.stderr, flush=True)
            results[side, d].append(spawn(a, side, "unet", d))
        gen_versions = gen_versions or results["ours", dtypes[0]][0]["versions"]
        raw["unet"] = {f"{side}-{d}": runs for (side, d), runs in results.items()}
        raw["flops"] = flops
        for d in dtypes:
            unet[d] = {"ours": unet_stats(flops, results["ours", d]),
                       "diffusers": unet_stats(flops, results["diffusers", d]) if a.vs_diffusers else None}

    for d in dtypes:  # per dtype, the tables of one dtype
        report += [f"#### {d}: text encoder and UNet {d}, VAE {vae_dtype(a, d)}", ""]
        if d in gen:
            report += generation_report(a, d, gen[d]["ours"], gen[d]["diffusers"], image_diff.get(d)) + [""]
        if d in unet:
            report += unet_report(a, d, flops, unet[d]["ours"], unet[d]["diffusers"]) + [""]
    if len(dtypes) > 1:
        report += [f"#### {' and '.join(dtypes)} side by side", ""] + cross_report(a, dtypes, gen, unet) + [""]
    targets = targets_report(a, dtypes, gen, unet)
    if targets:
        report += ["#### targets (medians of this run)", ""] + targets

    v = gen_versions
    import torch

    threads = a.threads or torch.get_num_threads()
    report += [f"Measured {datetime.date.today().isoformat()} on {machine()}; {threads} torch threads; "
               f"torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
               f"accelerate {v['accelerate']}, safetensors {v['safetensors']}; Python {platform.python_version()}. "
               f"Medians of {a.runs} runs per side and dtype, each a fresh subprocess, alternating "
               f"ours / diffusers (ABBA) within each dtype, the dtypes interleaved; weights read into the page cache "
               f"once before the first run. `import` includes transformers on both sides (sld_minimal's "
               f"from_pretrained would import it for CLIP's tokenizer), so `load` is the loading alone."
               + (f" Environment: {', '.join(a.env)}." if a.env else "")]
    if a.vs_diffusers:
        sched, options = DIFFUSERS_SCHEDULERS[a.scheduler]
        opts = "".join(f", {k}={v!r}" for k, v in options.items())
        report.append("diffusers: `StableDiffusionPipelineSafe.from_pretrained(DIR, safety_checker=None, "
                      "feature_extractor=None, requires_safety_checker=False, torch_dtype=…)` with accelerate "
                      "installed, so `low_cpu_mem_usage=True` (modules built empty, safetensors tensors assigned); it "
                      "also builds the VAE encoder, which sampling never runs and sld_minimal skips. Scheduler: "
                      f"`{sched}.from_pretrained(DIR, subfolder=\"scheduler\"{opts})`. SLD values passed explicitly "
                      "from the preset table (weak: s_S = 200, the authors' value; diffusers' own WEAK uses 20).")
    text = "\n".join(report)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
