"""Speed and memory of sld_minimal against diffusers' StableDiffusionPipelineSafe, on the same weights, side by side.

How to run it, what each figure is and how it is taken, the report's tables and the targets:
tests/benchmarks/README.md. Every measurement is a fresh subprocess, `bench_worker.py`, for one side and one dtype;
this script orders them, takes the medians and prints the report.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench_worker import DIFFUSERS_SCHEDULERS, MATMUL_BUDGET_S, MATMUL_N, T, attention_calls, latent_factor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's sld_minimal, installed or not
WORKER = Path(__file__).with_name("bench_worker.py")
DTYPES = ("fp32", "bf16", "fp16")  # what --dtype takes (a comma list of these)


# ================================================================ FLOPs, from the config

def unet_flops(weights: Path, size: int) -> dict:
    """GFLOP of one UNet forward at (3, 4, size/f, size/f): convolutions and matmuls counted by FlopCounterMode on
    the meta device, attention's QKᵀ and AV products from the config (the counter does not see them on CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from sld_minimal.unet import UNet2DConditionModel

    cfg = read_unet_config(weights)
    h = w = size // latent_factor(weights)
    with torch.device("meta"):
        x, ctx = torch.empty(3, cfg.in_channels, h, w), torch.empty(3, 77, cfg.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            UNet2DConditionModel(cfg)(x, torch.tensor(T), ctx)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # on meta, attention may be decomposed into bmm's or counted as an SDPA op: both are replaced by the formula
    attention_ops = [op for op in by_op if "bmm" in op or "attention" in op]
    conv_linear = sum(n for op, n in by_op.items() if op not in attention_ops)
    attention = attention_flops(cfg, 3, h, w, 77)
    return {"conv_linear": conv_linear / 1e9, "attention": attention / 1e9, "total": (conv_linear + attention) / 1e9,
            "attention_seen_by_counter": sum(by_op[op] for op in attention_ops) / 1e9}


def read_unet_config(weights: Path):
    from sld_minimal.unet import UNetConfig
    from sld_minimal.weights import read_config

    return read_config(UNetConfig, Path(weights) / "unet" / "config.json")


def attention_flops(cfg, batch, h, w, n_text) -> int:
    """Σ over attention calls of 4·B·N_q·N_kv·C (QKᵀ and AV, 2 FLOPs per multiply-add)."""
    return sum(n * 4 * b * nq * nkv * c for n, b, _, nq, nkv, c in attention_calls(cfg, batch, h, w, n_text))


def sld_arguments(safety: str) -> dict:
    """What the diffusers side is given for our preset (weak: the authors' s_S = 200; diffusers' WEAK has 20)."""
    from sld_minimal.guidance import PRESETS

    if safety not in PRESETS:  # off
        return {"sld_guidance_scale": 0.0}
    s = PRESETS[safety]
    return {"safety_concept": s.concept, "sld_guidance_scale": s.scale, "sld_warmup_steps": s.warmup_steps,
            "sld_threshold": s.threshold, "sld_momentum_scale": s.momentum_scale, "sld_mom_beta": s.momentum_beta}


# ================================================================ the orchestrator: runs and medians

def native_bf16() -> str:
    """Whether the CPU computes bf16 natively, from /proc/cpuinfo's flags (else oneDNN and PyTorch emulate it)."""
    try:
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"yes ({', '.join(found)})" if found else "no (emulated)"


def machine() -> str:
    """The CPU's model name, cores, memory and native bf16, from /proc."""
    info = {}
    for name in ("cpuinfo", "meminfo"):
        if Path(f"/proc/{name}").is_file():
            for key, _, value in (line.partition(":") for line in Path(f"/proc/{name}").read_text().splitlines()):
                info.setdefault(key.strip(), value.strip())
    cpu, mem = info.get("model name") or platform.processor(), info.get("MemTotal", "0").split()[0]
    return f"{cpu}, {os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB RAM, native bf16: {native_bf16()}"


def warm_page_cache(weights: Path):
    """Read every file once, so that every run, ours and theirs, loads from memory."""
    for p in sorted(weights.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def spawn(a, side: str, part: str, dtype: str, image_out=None) -> dict:
    """One `bench_worker.py` subprocess running `part` for `side` in `dtype`; its numbers come back as JSON."""
    spec = {"part": part, "side": side, "dtype": dtype, "weights": str(a.weights), "sld": sld_arguments(a.safety),
            "image_out": str(image_out) if image_out else None, "compile": a.compile and side == "ours"}
    spec |= {k: getattr(a, k) for k in ("size", "steps", "safety", "scheduler", "device", "unet_calls", "threads",
                                        "vae_fp32")}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **dict(e.split("=", 1) for e in a.env))
        proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), str(result)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            sys.exit(f"the {side} {part} subprocess ({dtype}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def order(runs: int, sides: list, dtypes: list) -> list:
    """(side, dtype) in ABBA order within each dtype; run i of every dtype before run i+1 of any."""
    return [(side, d) for i in range(runs) for d in dtypes for side in (sides if i % 2 == 0 else sides[::-1])]


def med(values):
    return statistics.median(values) if values else float("nan")


def summarize(results: list) -> dict:
    """Medians over the generation runs of one side and dtype."""
    unet = [sum(sum(v) for v in r["unet_s"].values()) for r in results]
    s = {k: med([r[k] for r in results]) for k in ("import_s", "load_s", "generation_s", "text_s", "vae_s",
                                                    "peak_rss_gib", "load_rss_gib", "faults_k", "sys_s")}
    s |= {"load_generation_s": med([r["load_s"] + r["generation_s"] for r in results]),
          "import_load_s": med([r["import_s"] + r["load_s"] for r in results]),
          "import_load_generation_s": med([r["import_s"] + r["load_s"] + r["generation_s"] for r in results]),
          "unet_total_s": med(unet), "text_calls": results[0]["text_calls"],
          "rest_s": med([r["generation_s"] - r["text_s"] - r["vae_s"] - u for r, u in zip(results, unet)])}
    for batch, calls in results[0]["unet_s"].items():
        s[f"unet_b{batch}_s"] = med([t for r in results for t in r["unet_s"][batch]])
        s[f"unet_b{batch}_calls"] = len(calls)
    return s


def unet_stats(flops: dict, results: list) -> dict:
    """Medians over the UNet-part runs of one side and dtype. The ceiling: the fraction of the matmul rate the
    forward would reach if its convolutions and matmuls ran at that rate and nothing but attention took time."""
    unet_s = med([t for r in results for t in r["unet_call_s"]])
    matmul = med([2 * r["matmul_n"]**3 / t / 1e9 for r in results for t in r["matmul_s"]])
    attention_s = med([r["attention_s"] for r in results])
    return {"unet_call_s": unet_s, "gflops": flops["total"] / unet_s, "matmul_gflops": matmul,
            "fraction": flops["total"] / unet_s / matmul, "attention_s": attention_s,
            "ceiling": flops["total"] / (flops["conv_linear"] / matmul + attention_s) / matmul,
            "faults_k": med([f for r in results for f in r["faults"]]) / 1e3,
            "peak_rss_gib": med([r["peak_rss_gib"] for r in results]), "matmul_dtype": results[0]["matmul_dtype"],
            "matmul_n": results[0]["matmul_n"], "matmuls_per_run": len(results[0]["matmul_s"])}


# ================================================================ the report (markdown)

def fmt(v) -> str:
    return "–" if v is None or v != v else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def ratio(n, m):
    return n / m if n is not None and m not in (None, 0) and m == m else None


def table(head: list, rows: list) -> list:
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)] + \
        ["| " + " | ".join(row) + " |" for row in rows]


def unet_batches(stats: dict) -> list:
    return sorted((k[len("unet_b"):-2] for k in stats if k.startswith("unet_b") and k.endswith("_s")), key=int)


def generation_report(a, dtype: str, ours: dict, ref: dict | None, image_diff) -> list:
    rows = [("import (s)", "import_s"), ("**load (s)**", "load_s"), ("import + load (s)", "import_load_s"),
            ("text encoding (s, all calls)", "text_s")]
    rows += [(f"UNet call, batch {b} (s, median)", f"unet_b{b}_s") for b in unet_batches({**ours, **(ref or {})})]
    rows += [("UNet, all calls (s)", "unet_total_s"), ("VAE decode (s)", "vae_s"),
             ("rest: scheduler, guidance, Python (s)", "rest_s"), ("**generation (s)**", "generation_s"),
             ("**load + generation (s)**", "load_generation_s"),
             ("import + load + generation (s)", "import_load_generation_s"),
             ("peak RSS after load (GiB)", "load_rss_gib"), ("**peak RSS (GiB)**", "peak_rss_gib"),
             ("minor page faults during generation (thousands)", "faults_k"),
             ("system CPU time during generation (s)", "sys_s")]
    sides = [ours, ref] if ref else [ours]
    head = [f"Generation, {a.size}×{a.size} px, {a.steps} steps, SLD {a.safety}, {a.scheduler}, {dtype} (VAE "
            f"{'fp32' if a.vae_fp32 else dtype})", "sld_minimal"] + (["diffusers", "ours / diffusers"] if ref else [])
    lines = table(head, [[label] + [fmt(s.get(key)) for s in sides]
                         + ([fmt(ratio(ours.get(key), ref.get(key)))] if ref else []) for label, key in rows])
    notes = [f"{name}: " + ", ".join(f"{s[f'unet_b{b}_calls']} at batch {b}" for b in unet_batches(s))
             for name, s in zip(("UNet calls per generation, ours", "diffusers"), sides)]
    if image_diff is not None:
        why = "" if dtype == "fp32" else f" (diffusers keeps latents and guidance in {dtype}, ours in fp32)"
        notes.append(f"images of the first runs: max |Δpixel| = {image_diff:.2e} (in [0, 1]){why}")
    return lines + ["", "; ".join(notes) + "."]


def unet_report(a, dtype: str, flops: dict, ours: dict, ref: dict | None) -> list:
    lat = a.size // latent_factor(a.weights)
    mm = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(ours["matmul_dtype"], ours["matmul_dtype"])
    sides = [("sld_minimal", ours)] + ([("diffusers", ref)] if ref else [])
    head = [f"UNet forward, batch 3, {a.size}×{a.size} px ({lat}×{lat} latent), {dtype}", "s / call", "GFLOP/s",
            f"{mm} matmul GFLOP/s", f"fraction of the {mm} matmul rate", "attention alone (s)", "ceiling",
            "page faults / call (k)", "peak RSS (GiB)"]
    rows = [[name, fmt(st["unet_call_s"]), f"{st['gflops']:.1f}", f"{st['matmul_gflops']:.1f}",
             f"**{st['fraction']:.0%}**", fmt(st["attention_s"]), f"{st['ceiling']:.0%}", f"{st['faults_k']:.0f}",
             fmt(st["peak_rss_gib"])] for name, st in sides]
    if ref:
        rows.append(["ours / diffusers", fmt(ratio(ours["unet_call_s"], ref["unet_call_s"]))] + [""] * 6
                    + [fmt(ratio(ours["peak_rss_gib"], ref["peak_rss_gib"]))])
    n = " and ".join(sorted({str(st["matmul_n"]) for _, st in sides}))
    small = "" if n == str(MATMUL_N) else f" (one {MATMUL_N}² product would take over {MATMUL_BUDGET_S:.0f} s here)"
    return table(head, rows) + [
        "", f"FLOPs per forward: {flops['total']:.1f} GFLOP = {flops['conv_linear']:.1f} convolutions and matmuls "
        f"(torch FlopCounterMode) + {flops['attention']:.1f} attention (4·B·N_q·N_kv·C, analytic; the counter saw "
        f"{flops['attention_seen_by_counter']:.1f} of it on the meta device). Matmul rate: {mm} n×n @ n×n, n = {n}"
        f"{small}, median of {ours['matmuls_per_run']} per run, measured in the same subprocess between the UNet "
        f"calls ({a.unet_calls} timed calls per run after one warm-up). Attention alone: "
        f"F.scaled_dot_product_attention at the forward's attention shapes, timed in the same subprocess; ceiling: "
        f"FLOPs / (conv_linear / matmul rate + attention alone) / matmul rate. Peak RSS: the UNet-only subprocess "
        f"(load, the forwards and the matmuls)."]


def cross_report(a, dtypes: list, gen: dict, unet: dict) -> list:
    """Every dtype side by side: each side's figure per dtype, then ours in each other dtype against diffusers in
    fp32 (what a CPU user runs by default) and in the same dtype, and against ours in fp32."""
    cols = [(side, d) for d in dtypes for side in (["ours", "diffusers"] if a.vs_diffusers else ["ours"])]
    ratios = [(f"ours-{d} / {s}-{rd}", ("ours", d), (s, rd)) for d in dtypes if d != "fp32"
              for s, rd, wanted in (("diffusers", "fp32", a.vs_diffusers and "fp32" in dtypes),
                                    ("diffusers", d, a.vs_diffusers), ("ours", "fp32", "fp32" in dtypes)) if wanted]
    rows = []  # (label, part, key)
    if gen:
        b = (unet_batches(gen[dtypes[0]]["ours"]) or [None])[-1]
        rows += [(f"generation, {a.steps} steps, SLD {a.safety} (s)", gen, "generation_s"),
                 ("load + generation (s)", gen, "load_generation_s")]
        rows += [(f"UNet call in generation, batch {b} (s)", gen, f"unet_b{b}_s")] if b else []
        rows += [("VAE decode (s)", gen, "vae_s"), ("peak RSS, generation (GiB)", gen, "peak_rss_gib")]
    if unet:
        rows += [("UNet forward, batch 3 (s, UNet part)", unet, "unet_call_s"),
                 ("UNet, fraction of the same dtype's matmul rate", unet, "fraction"),
                 ("UNet, ceiling with this attention kernel (see the UNet table)", unet, "ceiling"),
                 ("peak RSS, UNet part (GiB)", unet, "peak_rss_gib")]
    out = []
    for label, part, key in rows:
        value = lambda side, d: ((part.get(d) or {}).get(side) or {}).get(key)  # noqa: E731
        if key in ("fraction", "ceiling"):  # shares, not divided
            cells = ["–" if value(*c) is None else f"{value(*c):.0%}" for c in cols] + [""] * len(ratios)
        else:
            cells = [fmt(value(*c)) for c in cols] + [fmt(ratio(value(*n), value(*m))) for _, n, m in ratios]
        out.append([label] + cells)
    head = f"{a.size}×{a.size} px, {' and '.join(dtypes)} side by side" + ("; VAE fp32" if a.vae_fp32 else "")
    return table([head] + [f"{s} {d}" for s, d in cols] + [r[0] for r in ratios], out)


TARGETS = [  # (what, part, key, ours' dtype, diffusers' dtype or None for a bound on ours alone, op, bound, the
    # settings where it applies); "*": each dtype of the run, against diffusers in the same dtype. bf16: native CPUs.
    ("UNet forward, ours-bf16 / diffusers-bf16", "unet", "unet_call_s", "bf16", "bf16", "≤", 0.70, {}),
    ("UNet forward, ours-bf16, fraction of the bf16 matmul rate", "unet", "fraction", "bf16", None, "≥", 0.80, {}),
    ("generation, 256 px, 10 steps, SLD strong, ours-bf16 / diffusers-fp32", "generation", "generation_s",
     "bf16", "fp32", "≤", 0.33, {"size": 256, "steps": 10, "safety": "strong"}),
    ("peak RSS, generation, ours / diffusers, {d}", "generation", "peak_rss_gib", "*", "*", "≤", 1.00, {}),
    ("peak RSS, UNet part, ours / diffusers, {d}", "unet", "peak_rss_gib", "*", "*", "≤", 1.00, {}),
    ("UNet forward, 512 px, ours / diffusers, fp32", "unet", "unet_call_s", "fp32", "fp32", "≤", 0.90, {"size": 512}),
    ("generation, 512 px, ours / diffusers, fp32", "generation", "generation_s", "fp32", "fp32", "≤", 0.90,
     {"size": 512}),
    # earlier fp32 targets (the 256 px generation's did not hold on a Zen 5 EPYC)
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
    rows = []
    for what, part, key, od, rd, op, bound, where in TARGETS:
        for d in ([] if any(getattr(a, k) != v for k, v in where.items()) else dtypes if od == "*" else [od]):
            ref_d, stats = (d if rd == "*" else rd), (gen if part == "generation" else unet)
            ours, ref = stats.get(d, {}).get("ours"), stats.get(ref_d, {}).get("diffusers") if ref_d else None
            if ours is None or (ref_d and ref is None):
                continue
            value = ours[key] / ref[key] if ref_d else ours[key]
            note = " (this CPU emulates bf16; the target is for native bf16)" \
                if "bf16" in (d, ref_d) and not native and key not in ("peak_rss_gib", "load_s") else ""
            ok = value <= bound if op == "≤" else value >= bound
            rows.append([what.format(d=d), f"{op} {bound:.2f}", f"{value:.3f}", ("met" if ok else "MISSED") + note])
    lines = table(["target", "bound", "measured", ""], rows)
    return [lines[0], "|---|---:|---:|---|"] + lines[2:] + [""] if rows else []


# ================================================================ command line

def parser() -> argparse.ArgumentParser:
    from sld_minimal.guidance import PRESETS  # SLD's only: diffusers' Safe pipeline does not run SEGA
    from sld_minimal.schedulers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--weights", type=Path, help="an SD 1.x folder in the published diffusers layout")
    add("--write-random", type=Path, metavar="DIR", help="write full-size SD 1.4 random weights to DIR (if absent) "
        "and benchmark them")
    add("--vs-diffusers", action="store_true", help="run diffusers' StableDiffusionPipelineSafe too")
    add("--size", type=int, default=256, help="image height and width in pixels (default 256)")
    add("--steps", type=int, default=10)
    add("--safety", default="strong", choices=["off", *PRESETS], help="off or an SLD preset (default strong)")
    add("--scheduler", default="pndm", choices=list(SAMPLERS),
        help="a sampler of sld_minimal.schedulers.SAMPLERS (default pndm); diffusers runs its counterpart")
    add("--runs", type=int, default=3, help="subprocesses per side and dtype (alternating), medians reported")
    add("--unet-calls", type=int, default=3, help="timed UNet forwards per run in the UNet part")
    add("--only", choices=["generation", "unet"], help="run one part only (default: both)")
    add("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's, all cores)")
    add("--dtype", default="fp32", metavar="fp32,bf16",
        help="the dtype, or a comma list of them run side by side: fp32, bf16, fp16 (default fp32)")
    add("--vae-fp32", action="store_true", help="keep the VAE in fp32 when --dtype is fp16/bf16")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--compile", action="store_true", help="ours with torch.compile (opt-in; compile time is in load)")
    add("--out", type=Path, help="also write the report (markdown) to this file")
    add("--json", type=Path, help="also write every run's raw numbers to this file")
    add("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of both sides' subprocesses, "
        "e.g. MALLOC_MMAP_THRESHOLD_=4294967296 (repeatable)")
    return p


def check_args(p, a) -> list:
    """The run's dtypes, after refusing what cannot run; writes the random weights if asked."""
    dtypes = list(dict.fromkeys(x.strip().lower() for x in a.dtype.split(",")))
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"unknown dtype {unknown[0]!r}: a comma list of {', '.join(DTYPES)}")
    if a.device == "cpu" and "fp16" in dtypes:
        p.error("fp16 is not accelerated on the CPU: use --dtype bf16 or fp32")
    if a.vs_diffusers and a.scheduler not in DIFFUSERS_SCHEDULERS:
        p.error(f"--scheduler {a.scheduler} has no diffusers counterpart in bench.py's DIFFUSERS_SCHEDULERS: "
                f"with --vs-diffusers use one of {', '.join(DIFFUSERS_SCHEDULERS)}")
    if a.write_random and not (a.write_random / "model_index.json").is_file():
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
    return dtypes


def collect(a, part: str, sides: list, dtypes: list, images=None) -> dict:
    """{(side, dtype): [run, …]}: `a.runs` subprocesses per side and dtype, in `order`; the first run of each saves
    its image to `images[side, dtype]` if given."""
    results = defaultdict(list)
    for side, d in order(a.runs, sides, dtypes):
        print(f"{part} run {len(results[side, d]) + 1}/{a.runs}, {d}: {side} …", file=sys.stderr, flush=True)
        image_out = images[side, d] if images and not results[side, d] else None
        results[side, d].append(r := spawn(a, side, part, d, image_out))
        if part == "generation":
            calls = [t for v in r["unet_s"].values() for t in v]
            print(f"  load {r['load_s']:.2f} s, generation {r['generation_s']:.2f} s (UNet {len(calls)} calls, "
                  f"{min(calls):.2f}–{max(calls):.2f} s each; VAE {r['vae_s']:.2f} s), peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return results


def render(a, argv, dtypes, gen: dict, unet: dict, flops, image_diff: dict, versions: dict) -> str:
    """The markdown report: per dtype its generation and UNet tables, the dtypes side by side, the targets."""
    import torch

    what = "UNet forward" if a.only == "unet" else f"{a.steps} steps, SLD {a.safety}, {a.scheduler}"
    report = [f"### {'sld_minimal vs diffusers' if a.vs_diffusers else 'sld_minimal'}: {a.size}×{a.size} px, {what}, "
              f"{' and '.join(dtypes)}{', VAE fp32' if a.vae_fp32 else ''}, {a.device}", "", "```",
              "python tests/benchmarks/bench.py " + " ".join(argv), "```", "", f"native bf16: {native_bf16()}", ""]
    for d in dtypes:
        report += [f"#### {d}: text encoder and UNet {d}, VAE {'fp32' if a.vae_fp32 else d}", ""]
        if d in gen:
            report += generation_report(a, d, gen[d]["ours"], gen[d].get("diffusers"), image_diff.get(d)) + [""]
        if d in unet:
            report += unet_report(a, d, flops, unet[d]["ours"], unet[d].get("diffusers")) + [""]
    if len(dtypes) > 1:
        report += [f"#### {' and '.join(dtypes)} side by side", ""] + cross_report(a, dtypes, gen, unet) + [""]
    if targets := targets_report(a, dtypes, gen, unet):
        report += ["#### targets (medians of this run)", ""] + targets
    report.append(
        f"Measured {datetime.date.today().isoformat()} on {machine()}; {a.threads or torch.get_num_threads()} torch "
        f"threads; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; Python {platform.python_version()}. "
        f"Medians of {a.runs} runs per side and dtype, each a fresh subprocess, alternating ours / diffusers (ABBA) "
        f"within each dtype, the dtypes interleaved; weights read into the page cache once before the first run. "
        f"`import` includes transformers on both sides (sld_minimal's from_pretrained would import it for CLIP's "
        f"tokenizer), so `load` is the loading alone." + (f" Environment: {', '.join(a.env)}." if a.env else ""))
    if a.vs_diffusers:
        sched, options = DIFFUSERS_SCHEDULERS[a.scheduler]
        report.append("diffusers: `StableDiffusionPipelineSafe.from_pretrained(DIR, safety_checker=None, "
                      "feature_extractor=None, requires_safety_checker=False, torch_dtype=…)` with accelerate "
                      "installed, so `low_cpu_mem_usage=True` (modules built empty, safetensors tensors assigned); it "
                      "also builds the VAE encoder, which sampling never runs and sld_minimal skips. Scheduler: "
                      f"`{sched}.from_pretrained(DIR, subfolder=\"scheduler\""
                      + "".join(f", {k}={v!r}" for k, v in options.items()) + ")`. SLD values passed explicitly "
                      "from the preset table (weak: s_S = 200, the authors' value; diffusers' own WEAK uses 20).")
    return "\n".join(report)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    a = p.parse_args(argv)
    dtypes = check_args(p, a)
    sides = ["ours", "diffusers"] if a.vs_diffusers else ["ours"]
    print(f"warming the page cache with {a.weights} …", file=sys.stderr)
    warm_page_cache(a.weights)
    raw = {"args": {k: str(v) for k, v in vars(a).items()}, "dtypes": dtypes}
    gen, unet, image_diff, flops = {}, {}, {}, None  # gen, unet: dtype -> side -> medians
    if a.only in (None, "generation"):
        with tempfile.TemporaryDirectory() as tmp:
            images = {(side, d): Path(tmp) / f"{side}-{d}.npy" for side in sides for d in dtypes}
            results = collect(a, "generation", sides, dtypes, images)
            if a.vs_diffusers:
                import numpy as np

                image_diff = {d: float(np.abs(np.load(images["ours", d]) - np.load(images["diffusers", d])).max())
                              for d in dtypes}
        raw["generation"] = {f"{side}-{d}": runs for (side, d), runs in results.items()}
        gen = {d: {side: summarize(results[side, d]) for side in sides} for d in dtypes}
    if a.only in (None, "unet"):
        flops, results = unet_flops(a.weights, a.size), collect(a, "unet", sides, dtypes)
        raw |= {"unet": {f"{side}-{d}": runs for (side, d), runs in results.items()}, "flops": flops}
        unet = {d: {side: unet_stats(flops, results[side, d]) for side in sides} for d in dtypes}
    versions = (raw.get("generation") or raw["unet"])[f"ours-{dtypes[0]}"][0]["versions"]
    text = render(a, argv, dtypes, gen, unet, flops, image_diff, versions)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
