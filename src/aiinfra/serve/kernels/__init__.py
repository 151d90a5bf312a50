"""Native CPU kernels of the serving engine, compiled on first use for the machine that runs them.

No CPU paged-attention library works with this project's torch (IPEX stops at torch 2.8; FlashInfer is CUDA only),
so the one kernel the engine needs, decode attention over the paged cache (`paged_attention.cpp`), is ours: plain
C++ with a C ABI, no torch headers, called through ctypes (which releases the GIL). It is compiled with the system's
C++ compiler (`$CXX`, else `c++`/`g++`) at -O3 for the host CPU into a per-user cache
(`$AIINFRA_KERNEL_CACHE`, else `~/.cache/aiinfra/kernels`), keyed by the source, the compiler and the CPU's feature
flags, and written atomically (a half-built library is never loaded). Where no compiler is found or the build fails,
`paged_decode_attention()` returns None once, with the reason in the log, and the engine keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# Where decode attention runs on CPU: the kernel, the torch path, or the kernel where it builds.
ATTENTION_BACKENDS = ("auto", "native", "torch")
# -O3 and the host's vector units; reassociation lets the compiler vectorize the dot products (no -ffast-math: NaN
# and infinity keep their meaning).
FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp",
         "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    return Path(os.environ.get("AIINFRA_KERNEL_CACHE") or Path.home() / ".cache" / "aiinfra" / "kernels")


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def build(source: Path = SOURCE) -> Path:
    """Compile `source` (once per source, compiler and CPU) and return the shared library's path."""
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, " ".join(FLAGS), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: another process sees the old state or the whole library
    return target


@functools.cache
def paged_decode_attention() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) where it cannot be built here."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as error:
        log.warning("native paged attention unavailable, using the torch path: %s", error)
        return None
    function = library.aiinfra_paged_decode_attention
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return library
