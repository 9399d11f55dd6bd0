"""Build the CUDA kernels (plugins/kernels.cu) into one shared library with nvcc, for sm_80 and
sm_90 (the CUDA runtime linked statically, so the library loads on any machine with a driver).
`lowbit plugins build [--out DIR]`; CI runs it on its CPU machine, so a kernel that does not
compile cannot land."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from lowbit.ir.errors import LowbitError

SOURCE = Path(__file__).with_name("kernels.cu")
LIBRARY = "liblowbit_plugins.so"
ARCHS = ("80", "90")
ENTRY_POINTS = ("lowbit_w4_matmul", "lowbit_w4_dequant", "lowbit_lut_matmul", "lowbit_csr_add", "lowbit_hadamard")


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"]
                                         if p.exists()), None)


def default_dir() -> Path:
    from lowbit.ir.load import cache_dir
    return cache_dir() / "plugins"


def build(out: Path | None = None, archs=ARCHS) -> Path:
    """Compile kernels.cu; returns the library's path (rebuilt only when the source is newer)."""
    compiler = nvcc()
    if compiler is None:
        raise LowbitError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    out = Path(out or default_dir())
    lib = out / LIBRARY
    if lib.exists() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return lib
    out.mkdir(parents=True, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory(dir=out) as tmp:   # moved into place whole
        cmd = [compiler, "-O3", "--threads", "0", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", *gencode,
               "-o", str(Path(tmp) / LIBRARY), str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LowbitError(f"nvcc failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
        os.replace(Path(tmp) / LIBRARY, lib)
    return lib
