"""What results.json records about where a run came from, in a form that travels: paths that are no machine's
absolute paths, and the hardware the run ran on (its timings depend on it)."""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path

import torch

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
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def cpu_instructions() -> str:
    """The widest of AMX, AVX-512 BF16, AVX-512 and AVX2 that torch finds on the CPU (its kernels use it)."""
    return next((name for name, probe in CPU_INSTRUCTIONS if getattr(torch.cpu, probe, lambda: False)()),
                "none of " + ", ".join(name for name, _ in CPU_INSTRUCTIONS))


def hardware(device: torch.device) -> dict:
    """The machine a run runs on: CPU, its instruction-set class, torch's threads, and the GPU if it uses one."""
    return {"cpu": cpu_name(), "cpu_instructions": cpu_instructions(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def describe_hardware(machine: dict) -> str:
    """One line for reports: 'AMD EPYC 7B13 (AVX2), 8 torch threads' (+ ', GPU NVIDIA H200')."""
    threads = machine["torch_threads"]
    return (f"{machine['cpu']} ({machine['cpu_instructions']}), {threads} torch thread{'' if threads == 1 else 's'}"
            + (f", GPU {machine['gpu']}" if machine["gpu"] else ""))
