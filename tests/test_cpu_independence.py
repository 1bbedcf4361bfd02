"""The bit-exact tests hold on any x86 CPU, not only on the one CI happens to get.

oneDNN picks its kernels (and so the order in which it sums) by the CPU's instruction set, and within one CPU by
the shapes and the alignment of the data. A test that compares two computations bit for bit — two layouts of the
same weights, a branch skipped or computed, a run resumed or not — must hold for every kernel family. CI machines
differ (Intel or AMD, with or without AVX-512), so the tests marked `bitexact` are run a second time here, in a
fresh process limited to AVX2 kernels (`ONEDNN_MAX_CPU_ISA` is read once, when oneDNN starts), as an older or
different CPU would run them. So are the tests marked `isa`: tolerance tests (bf16's, emulated under AVX2) that
must hold for every kernel family too.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bitexact_tests_pass_with_avx2_kernels():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "bitexact or isa", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"bit-exact and isa tests under ONEDNN_MAX_CPU_ISA=AVX2: {summary}\n{run.stdout[-4000:]}"
    assert " passed" in summary and "deselected" in summary, summary  # they ran, and only they
