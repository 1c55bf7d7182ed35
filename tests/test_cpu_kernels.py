"""The settings ella gives torch's CPU kernel libraries when it is imported (``ella.cpu_kernels``): checked in a
fresh process, where torch loads after ella as in the ``ella`` command, and in this one with the steps faked."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ella import cpu_kernels

AMD = cpu_kernels.cpuinfo().get("vendor_id") == "AuthenticAMD"
COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL: no vendor check")


def fresh_process(script: str, tmp_path, **environment) -> str:
    """stdout of ``script`` in a new interpreter whose ella cache is ``tmp_path`` (no override's library yet)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY",
                                                            cpu_kernels.MKL_OVERRIDE_ENV, "LD_PRELOAD")}
    env.update(ELLA_CACHE_DIR=str(tmp_path), **environment)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("preset", [None, "64"])
def test_importing_ella_bounds_onednn_kernel_caches_unless_the_user_set_them(preset, tmp_path):
    """Set before any product runs, so oneDNN and ideep read them at their first use."""
    read = "import os, ella; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    out = fresh_process(read, tmp_path, **({"LRU_CACHE_CAPACITY": preset} if preset else {}))
    assert out.split() == ["16", preset or "16"]


VENDOR_CHECK_AND_PRODUCT = """
import ella, torch
from ella.provenance import mkl_vendor_check
torch.manual_seed(0)
x, w = torch.randn(300, 576), torch.randn(576, 1536)
exact = x.double() @ w.double()
print(mkl_vendor_check()); print(float(((x @ w).double() - exact).abs().max() / exact.abs().max()))
"""


@needs_mkl
def test_importing_ella_makes_mkl_take_intel_kernels_on_amd_and_products_stay_exact(tmp_path):
    """On an AMD CPU ella builds the override's library into its cache and loads it ahead of torch: MKL's check
    says Intel. On an Intel CPU it says so by itself. The fp32 product agrees with float64 to fp32 rounding."""
    check, error = fresh_process(VENDOR_CHECK_AND_PRODUCT, tmp_path).splitlines()
    if not AMD:
        assert check == "says Intel (not overridden: not an AMD CPU)"
    elif COMPILER is None:
        assert check == "says not Intel (not overridden: no C compiler (cc or gcc) to build the override's library)"
    else:
        assert check == "says Intel (overridden by ella)"
        assert [p.name for p in tmp_path.iterdir()] == [cpu_kernels.MKL_OVERRIDE_LIBRARY]  # no half-built leftovers
        # the next process loads the library built by the first
        assert fresh_process(VENDOR_CHECK_AND_PRODUCT, tmp_path).splitlines()[0] == check
    assert float(error) < 1e-5


@needs_mkl
@pytest.mark.parametrize("case", ["switched off", "torch first"])
def test_mkl_keeps_its_own_choice_when_switched_off_or_when_torch_loaded_first(case, tmp_path):
    script = VENDOR_CHECK_AND_PRODUCT.replace("import ella, torch", "import torch, ella" if case == "torch first"
                                              else "import ella, torch")
    check = fresh_process(script, tmp_path, **({cpu_kernels.MKL_OVERRIDE_ENV: "0"} if case == "switched off" else {})
                          ).splitlines()[0]
    why = ("ELLA_MKL_OVERRIDE=0" if case == "switched off" else
           "torch was imported before ella; import ella first" if AMD else "not an AMD CPU")
    assert check == f"says {'not Intel' if AMD else 'Intel'} (not overridden: {why})"
    assert not (tmp_path / cpu_kernels.MKL_OVERRIDE_LIBRARY).exists()


def test_a_failed_build_is_reported_and_leaves_nothing(monkeypatch, tmp_path):
    """A compiler that fails: ella still loads, says why MKL keeps its choice, and leaves no partial files."""
    monkeypatch.setattr(cpu_kernels, "cpuinfo", lambda: {"vendor_id": "AuthenticAMD"})
    monkeypatch.setattr(cpu_kernels.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delitem(sys.modules, "torch")  # as before torch loads
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: "/bin/false")
    monkeypatch.setenv("ELLA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.MKL_OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "mkl_override_status", "unset")
    cpu_kernels.configure()
    assert cpu_kernels.mkl_override_status == "not overridden: RuntimeError: /bin/false failed: "
    assert list(tmp_path.iterdir()) == []


@needs_mkl
@pytest.mark.skipif(not (AMD and sys.platform == "linux"), reason="ella loads the override's library on AMD CPUs only")
def test_a_damaged_library_is_reported_and_removed_so_the_next_import_rebuilds_it(tmp_path):
    (tmp_path / cpu_kernels.MKL_OVERRIDE_LIBRARY).write_text("not a shared library")
    check = fresh_process("import ella, torch\nfrom ella.provenance import mkl_vendor_check\nprint(mkl_vendor_check())",
                          tmp_path)
    assert check.startswith("says not Intel (not overridden: OSError: ")
    assert not (tmp_path / cpu_kernels.MKL_OVERRIDE_LIBRARY).exists()
