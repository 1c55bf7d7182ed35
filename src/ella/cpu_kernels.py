"""Settings of torch's CPU kernel libraries, made when ella is imported: before torch loads, since both libraries
read them once, at their first use.

- oneDNN's kernel caches, capped. torch's bf16 matrix products on a CPU go through oneDNN, which keeps up to 1,024
  compiled kernels (one per set of shapes), and torch's ideep layer above it as many again. Passes of varying length
  bring new shapes at every step, so the two caches grew a bf16 run's memory by about 35 MB a step (a two-task
  SmolLM2 run peaked at 3.4 GB, at 2.3 GB with 16 entries each, its steps and evaluation no slower). A value the
  user set stays.
- MKL's kernels chosen by instruction set on AMD CPUs. torch's fp32 matrix products go through MKL, which picks its
  kernels by CPU vendor: on an AMD CPU it takes others than on an Intel CPU with the same instructions. On AMD EPYC
  family 26 (AVX-512) fp32 products ran at 0.16-0.19 TFLOP/s with MKL's choice and 0.33-0.48 with the Intel
  kernels, and ella's fp32 training step of SmolLM2 ran 1.7-2.1x faster; its bf16 step, which calls MKL only for
  the merges, ran 4-24 % slower, not yet explained (benchmarks/speed.py measures both on the CPU at hand; on an
  AMD EPYC with AVX2 only, the fp32 step was no faster and evaluation 1.1-1.3x). MKL asks one internal function,
  ``mkl_serv_intel_cpu_true``, whether the CPU is Intel's; ella builds (once, with the machine's C compiler, into
  its cache directory) a library whose function of that name answers yes, and loads it ahead of torch so that MKL
  calls it. Intel does not support this; the kernels only use instructions the CPU reports. ``ELLA_MKL_OVERRIDE=0``
  keeps MKL's own choice; results.json records which one ran (``hardware.mkl_vendor_check``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

MKL_OVERRIDE_ENV = "ELLA_MKL_OVERRIDE"
MKL_OVERRIDE_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
MKL_OVERRIDE_LIBRARY = "libella_mkl_intel_cpu.so"

# What ella did about MKL's vendor check in this process (one line, for results.json): set by ``configure``.
mkl_override_status = "not attempted: ella.cpu_kernels.configure() has not run"


def cache_dir() -> Path:
    """Where ella keeps what it makes once: $ELLA_CACHE_DIR, else $XDG_CACHE_HOME/ella, else ~/.cache/ella."""
    if os.environ.get("ELLA_CACHE_DIR"):
        return Path(os.environ["ELLA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ella"


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def configure() -> None:
    """Cap oneDNN's caches and override MKL's vendor check (see the module's docstring); never raises."""
    global mkl_override_status
    for capacity in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(capacity, "16")
    try:
        mkl_override_status = override_mkl_vendor_check()
    except Exception as e:  # a failed speed-up must never stop ella from loading
        mkl_override_status = f"not overridden: {type(e).__name__}: {e}"


def override_mkl_vendor_check() -> str:
    """Load the override's library ahead of torch where it applies; what was done, in one line."""
    if os.environ.get(MKL_OVERRIDE_ENV, "1") == "0":
        return f"not overridden: {MKL_OVERRIDE_ENV}=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"not overridden: applies on Linux x86-64 only (this is {platform.system()} {platform.machine()})"
    if cpuinfo().get("vendor_id") != "AuthenticAMD":
        return "not overridden: not an AMD CPU"
    if "torch" in sys.modules:  # MKL's first call to the check may already be bound to its own
        return "not overridden: torch was imported before ella; import ella first"
    library = cache_dir() / MKL_OVERRIDE_LIBRARY
    if not library.is_file():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return "not overridden: no C compiler (cc or gcc) to build the override's library"
        build_library(compiler, library)
    try:
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
    except OSError:
        library.unlink(missing_ok=True)  # a damaged copy: the next import builds it again
        raise
    return "overridden by ella"


def build_library(compiler: str, library: Path) -> None:
    """Compile ``MKL_OVERRIDE_SOURCE`` into ``library``; written beside and renamed, so that processes starting
    together never load a half-written file."""
    library.parent.mkdir(parents=True, exist_ok=True)
    source = library.with_name(f"{library.stem}.{os.getpid()}.c")
    partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
    try:
        source.write_text(MKL_OVERRIDE_SOURCE)
        done = subprocess.run([compiler, "-shared", "-fPIC", "-o", str(partial), str(source)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-300:]}")
        os.replace(partial, library)
    finally:
        source.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
