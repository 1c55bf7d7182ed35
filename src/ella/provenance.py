"""What results.json records about where a run came from, in a form that travels: paths that are no machine's
absolute paths, and the hardware the run ran on (its timings depend on it)."""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
from pathlib import Path

import torch

from . import cpu_kernels

OUTSIDE = "…/"  # marks a path outside the working directory, of which only the last component is recorded
CPU_INSTRUCTIONS = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"),
                    ("AVX-512", "_is_avx512_supported"), ("AVX2", "_is_avx2_supported"))  # widest first


def portable_path(path: str | Path) -> str:
    """``path`` as results.json records it: as given if relative; relative to the working directory (the
    repository, usually) if it lies inside it; otherwise only its last component, after "…/"."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return OUTSIDE + path.name


def portable_command(argv: list[str]) -> str:
    """The ``ella`` command line with every absolute path in it (an argument, or --option=PATH) made portable."""
    def portable(argument: str) -> str:
        option, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
        return option + equals + (portable_path(value) if os.path.isabs(value) else value)

    return "ella " + shlex.join(map(portable, argv))


def cpu_name() -> str:
    return cpu_kernels.cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_model() -> str | None:
    """'family 25 model 1 stepping 1': what tells apart CPUs that a virtual machine names alike ('AMD EPYC')."""
    info = cpu_kernels.cpuinfo()
    if "cpu family" not in info:
        return None
    return f"family {info['cpu family']} model {info.get('model')} stepping {info.get('stepping')}"


def l3_cache() -> str | None:
    """The last-level cache that the first CPU sees, as Linux reports it ('32 MiB'); None where it is not reported."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return f"{int(size[:-1]) // 1024} MiB" if size.endswith("K") and int(size[:-1]) >= 1024 else size
        except (OSError, ValueError):
            return None
    return None


def cpu_instructions() -> str:
    """The widest of AMX, AVX-512 BF16, AVX-512 and AVX2 that torch finds on the CPU (its kernels use it)."""
    return next((name for name, probe in CPU_INSTRUCTIONS if getattr(torch.cpu, probe, lambda: False)()),
                "none of " + ", ".join(name for name, _ in CPU_INSTRUCTIONS))


def mkl_vendor_check() -> str | None:
    """What MKL's vendor check answers in this process ('Intel': MKL takes its kernels by instruction set) and what
    ella did about it (``ella.cpu_kernels``); None where torch has no MKL or the check is not found."""
    if not torch.backends.mkl.is_available():
        return None
    # the check MKL calls: one loaded ahead of torch (by ella, or LD_PRELOAD) if any, else torch's own
    for library in (None, str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")):
        try:
            says_intel = ctypes.CDLL(library).mkl_serv_intel_cpu_true()
        except (AttributeError, OSError):
            continue
        return f"says {'Intel' if says_intel else 'not Intel'} ({cpu_kernels.mkl_override_status})"
    return None


def hardware(device: torch.device) -> dict:
    """The machine a run runs on: CPU (its name, model and L3 cache: virtual machines give different CPUs one name),
    its instruction-set class, MKL's vendor check, torch's threads, and the GPU if it uses one."""
    return {"cpu": cpu_name(), "cpu_model": cpu_model(), "l3_cache": l3_cache(), "cpu_instructions": cpu_instructions(),
            "mkl_vendor_check": mkl_vendor_check(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def describe_hardware(machine: dict) -> str:
    """One line for reports: 'AMD EPYC (family 25 model 1 stepping 1, 32 MiB L3, AVX2), 2 torch threads'
    (+ ", MKL's Intel kernels" where ella overrode MKL's vendor check, ', GPU NVIDIA H200'); a record from before ella
    recorded the model and the cache has neither."""
    details = [machine.get("cpu_model"), machine.get("l3_cache") and f"{machine['l3_cache']} L3",
               machine["cpu_instructions"],
               "MKL's Intel kernels" if "overridden by ella" in (machine.get("mkl_vendor_check") or "") else None]
    threads = f"{machine['torch_threads']} torch thread{'' if machine['torch_threads'] == 1 else 's'}"
    return (f"{machine['cpu']} ({', '.join(filter(None, details))}), {threads}"
            + (f", GPU {machine['gpu']}" if machine["gpu"] else ""))
