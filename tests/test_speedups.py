"""The speed-ups (`speedups.py`: the small-map convolution path, laid over the plain models where the pipeline is
built) and the pipeline's other speed options: the VAE's own dtype, the opt-in torch.compile and glibc's malloc kept
from returning freed memory (`keep_freed_memory`).
(Timings are not tested here; `tests/benchmarks/bench.py` measures them.)"""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from sld_minimal import clip, speedups, unet, vae
from sld_minimal.diffusers_folder import load_component
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.speedups import SmallMapConv2d
from sld_minimal.testing import rel_err

TOL = 1e-5  # as the module parity tests


@pytest.mark.parametrize("batch, cin, cout, k, stride, size, matmul", [
    (1, 32, 48, 3, 1, (4, 4), True),      # the im2col + matmul path (≤ 64 positions, C_out ≥ 2·B·positions)
    (2, 32, 160, 3, 1, (5, 7), True),     # odd, non-square
    (1, 32, 80, 3, 2, (9, 13), True),     # a downsampler: stride 2 on an odd map (5×7 out)
    (1, 64, 128, 1, 1, (8, 8), True),     # a 1×1 shortcut, exactly 64 positions
    (3, 32, 48, 3, 1, (4, 4), False),     # the activations outweigh the weight: nn.Conv2d itself
    (1, 32, 48, 3, 1, (16, 16), False),   # above 64 positions: nn.Conv2d itself
])
def test_small_map_conv_equals_conv2d(batch, cin, cout, k, stride, size, matmul):
    torch.manual_seed(0)
    ours = SmallMapConv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, cin, *size)
    assert ours.uses_matmul(x) == matmul
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    assert y.shape == y_ref.shape and y.is_contiguous()
    assert rel_err(y, y_ref) <= TOL


def test_model_files_are_plain_architecture():
    """unet.py, vae.py and clip.py build plain nn modules; the speed-ups live in speedups.py alone."""
    for module in (unet, vae, clip):
        local = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, nn.Module)]
        assert not [c for c in local if issubclass(c, (nn.Conv2d, nn.Embedding))], module.__name__
    with torch.device("meta"):
        model = unet.UNet2DConditionModel(unet.UNetConfig())
    assert {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)} == {nn.Conv2d}


def test_the_loader_returns_plain_modules(tiny_ckpt):
    """The strict reader builds the architecture as written; the speed-ups are the pipeline's choice."""
    for component in ("unet", "vae"):
        assert not any(type(m) is SmallMapConv2d for m in load_component(tiny_ckpt, component).modules())


def test_the_pipeline_applies_the_small_map_path_to_resnets_and_samplers_only(tiny_ckpt):
    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    model = pipe.unet
    fast = {name for name, m in model.named_modules() if type(m) is SmallMapConv2d}
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    expected = {n for n in convs if ".resnets." in n or "samplers.0.conv" in n}
    assert fast == expected and "conv_in" not in fast and not any("proj_" in n for n in fast)
    assert speedups.apply(model) is model and fast == {n for n, m in model.named_modules()
                                                       if type(m) is SmallMapConv2d}  # applying twice: the same
    decoder = pipe.vae  # the VAE's resnets too (they are the UNet's ResnetBlock2D)
    assert {n for n, m in decoder.named_modules() if type(m) is SmallMapConv2d} == {
        n for n, m in decoder.named_modules() if isinstance(m, nn.Conv2d) and ".resnets." in n}


def test_loaded_unet_equals_the_plain_one(tiny_ckpt):
    """The speed-ups change the summation order only: the loaded UNet within 1e-5 of the same module made plain."""
    fast = StableDiffusion.from_pretrained(tiny_ckpt).unet
    plain = unet.UNet2DConditionModel(fast.config)
    plain.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, fast.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert rel_err(fast(x, 10, ctx), plain(x, 10, ctx)) <= TOL


def test_vae_dtype(tiny_ckpt):
    """fp16 pipeline with an fp32 VAE: the decode runs in fp32 and the image is close to the all-fp32 one."""
    pipe = StableDiffusion.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert pipe.dtype == torch.bfloat16 and pipe.vae.post_quant_conv.weight.dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    full = StableDiffusion.from_pretrained(tiny_ckpt)
    ref = full.decode(z)
    assert pipe.decode(z).dtype == torch.float32
    vae_ref = full.vae.to(torch.bfloat16).to(torch.float32)  # the same weights: rounded to bf16, cast back
    with torch.no_grad():
        assert rel_err(pipe.decode(z), vae_ref(z)) <= TOL
    assert rel_err(pipe.decode(z), ref) < 0.05  # only the bf16 rounding of the weights


def test_compile_is_opt_in(tiny_ckpt):
    """Eager by default; `compile()` wraps the UNet (here with dynamo's eager backend: no compiler needed) and
    the generation stays the same."""
    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    kw = dict(safety="strong", num_inference_steps=3, height=32, width=32, seed=0, progress=False)
    eager = pipe("a photo of the cat", **kw).images
    assert pipe.compile(backend="eager") is pipe
    assert type(pipe.unet).__name__ == "OptimizedModule" and pipe.device.type == "cpu"
    assert rel_err(pipe("a photo of the cat", **kw).images, eager) <= TOL


# a process (without transparent huge pages) that allocates ten 8 MiB blocks and frees them, five times after a
# warm-up, printing its minor page faults; argv[1] "keep": after speedups.keep_freed_memory(), whose result it
# prints first
CYCLES = """
import ctypes, resource, sys, torch
from sld_minimal import speedups
if sys.platform == "linux":  # PR_SET_THP_DISABLE: 4 KiB pages whatever the machine's THP setting
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
print(speedups.keep_freed_memory() if sys.argv[1] == "keep" else None)
def cycle():
    blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(10)]
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _cycles(mode, **env):
    env = {k: v for k, v in os.environ.items()  # glibc's own malloc, untuned, unless the test says otherwise
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | env
    run = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    kept, faults = run.stdout.split()
    return kept, int(faults)


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_fresh_pages():
    """With glibc, 80 MiB of freed blocks stay with the process and serve the next allocations without page
    faults, where by default glibc trims the free memory above twice its threshold (here 8 MiB) from the heap
    and the next allocations fault those pages in afresh."""
    _, default = _cycles("plain")
    kept, faults = _cycles("keep")
    assert kept == str(GLIBC)
    if GLIBC:
        assert default > 0 and faults * 4 <= default, (faults, default)


def test_keep_freed_memory_leaves_the_users_malloc_settings_alone():
    _, default = _cycles("plain")
    for env in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        kept, faults = _cycles("keep", **env)
        assert kept == "False"
        if GLIBC:
            assert faults * 4 > default, (env, faults, default)


def test_a_cpu_pipeline_keeps_freed_memory(tiny_ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr(speedups, "keep_freed_memory", lambda: calls.append(1))
    StableDiffusion.from_pretrained(tiny_ckpt)
    assert calls == [1]
