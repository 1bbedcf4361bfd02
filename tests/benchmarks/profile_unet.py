"""Where one UNet forward spends its time, by operator: torch.profiler's self CPU time around one forward of
sld_minimal's UNet (batch 3, after two warm-ups), with the attention calls broken down by shape; then, from three
forwards without the profiler (medians), the FLOP rate of each convolution and linear layer shape (forward hooks).

    python tests/benchmarks/profile_unet.py --weights /tmp/sd14_random --size 256 --dtype bf16

The profiler adds its own overhead (printed: the forward's time with and without it). README's performance
section quotes this output; `bench.py` gives the timings without a profiler.
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's sld_minimal, installed or not
from sld_minimal import speedups  # noqa: E402
from sld_minimal.diffusers_folder import load_component  # noqa: E402
from sld_minimal.vae import VAEConfig  # noqa: E402
from sld_minimal.weights import read_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True, help="an SD 1.x folder in the published diffusers layout")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    lat = a.size // read_config(VAEConfig, a.weights / "vae" / "config.json").factor
    unet = speedups.apply(load_component(a.weights, "unet", "cpu", dtype))  # as StableDiffusion.from_pretrained does
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, unet.config.in_channels, lat, lat, generator=g).to(dtype)
    ctx = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([500] * 3)
    with torch.inference_mode():
        unet(x, t, ctx), unet(x, t, ctx)
        t0 = time.perf_counter()
        unet(x, t, ctx)
        plain = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            unet(x, t, ctx)
            profiled = time.perf_counter() - t0
    by_op = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(by_op.values())
    print(f"UNet forward, batch 3, {a.size} px, {a.dtype}, {torch.get_num_threads()} threads: {plain:.2f} s "
          f"({profiled:.2f} s under the profiler; self CPU time summed over operators {total:.2f} s)")
    for op, sec in sorted(by_op.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"  {sec:7.3f} s  {100 * sec / total:5.1f} %  {op}")
    attention = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("aten::_scaled_dot_product"):  # the kernel that ran, not the dispatching op
            key = f"q {tuple(e.input_shapes[0])}, k/v {tuple(e.input_shapes[1])}"
            attention[(e.key, key)][0] += e.self_cpu_time_total / 1e6
            attention[(e.key, key)][1] += e.count
    print("attention calls by shape (self CPU time, calls):")
    for (op, shape), (sec, n) in sorted(attention.items(), key=lambda kv: -kv[1][0]):
        print(f"  {sec:7.3f} s  ×{n}  {shape}  {op}")
    with torch.inference_mode():
        layers = layer_rates(unet, x, t, ctx)
    seconds, gflop = sum(v[0] for v in layers.values()), sum(v[1] for v in layers.values())
    print(f"convolutions and linear layers (timed by forward hooks): {gflop:.1f} GFLOP in {seconds:.2f} s, "
          f"{gflop / seconds:.0f} GFLOP/s; by shape (time, calls, GFLOP/s):")
    for key, (sec, gf, n) in sorted(layers.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"  {sec:7.3f} s  ×{n:<2d} {gf / sec:5.0f}  {label(key)}")
    key, (sec, gf, n) = max(layers.items(), key=lambda kv: kv[1][1] / kv[1][0])
    print(f"the fastest shape: {gf / sec:.0f} GFLOP/s, {label(key)}")


def label(key) -> str:
    """A `layer_rates` key as text: "conv (3, 320, 32, 32) -> 320, 3×3/1" or "linear (3, 1024, 320) -> 2560"."""
    kind, shape, out, kernel = key
    return f"{kind} {shape} -> {out}" + (f", {kernel}" if kernel else "")


def layer_rates(unet, x, t, ctx, forwards=3) -> dict:
    """{(kind, input shape, out features, kernel): [seconds, GFLOP, calls]} per forward, each nn.Conv2d and
    nn.Linear call timed from its pre-hook to its hook (FLOPs: 2 per multiply-add, from the output's size); the
    seconds are the median over `forwards` forwards."""
    runs = []
    start = {}

    def pre(module, args):
        start[module] = time.perf_counter()

    def post(module, args, out):
        sec = time.perf_counter() - start.pop(module)
        conv = isinstance(module, nn.Conv2d)
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] if conv else module.in_features
        kernel = f"{module.kernel_size[0]}×{module.kernel_size[1]}/{module.stride[0]}" if conv else ""
        key = ("conv" if conv else "linear", tuple(args[0].shape), out.shape[1 if conv else -1], kernel)
        runs[-1][key][0] += sec
        runs[-1][key][1] += 2 * out.numel() * fan_in / 1e9
        runs[-1][key][2] += 1

    hooks = [h for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
             for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        for _ in range(forwards):
            runs.append(defaultdict(lambda: [0.0, 0.0, 0]))
            unet(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    return {key: [statistics.median(r[key][0] for r in runs), gf, n] for key, (_, gf, n) in runs[0].items()}


if __name__ == "__main__":
    main()
