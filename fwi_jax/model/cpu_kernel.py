"""Building and loading the C++ sources in csrc/ as XLA FFI targets for the CPU.

Each source is compiled on its first use in a process with the system C++ compiler ($CXX, else
g++ or c++ on PATH) against jaxlib's FFI headers, for this machine's CPU (-march=native, or
$FWI_JAX_KERNEL_ARCH), and the shared library is cached under $FWI_JAX_CACHE/kernels (default
~/.cache/fwi_jax/kernels), keyed by the source, the headers beside it, flags, compiler, jax
version and CPU; later processes load it without compiling. Where that is impossible (no
compiler, not Linux, a missing library) `CpuKernel.load` raises KernelBuildError saying why.

Used by `fused_attention` (the attention kernel) and `onednn` (dense layers on oneDNN).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

CSRC = Path(__file__).parent / "csrc"
# No -ffast-math: it would link crtfastmath.o, which turns on flush-to-zero for the whole process.
FLAGS = (
    "-std=c++17",
    "-O3",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-fPIC",
    "-shared",
)


class KernelBuildError(RuntimeError):
    """A C++ kernel cannot be built or loaded on this machine."""


def find_compiler(what: str = "the kernel", instead: str = "") -> str:
    """The C++ compiler kernels are built with: $CXX if set (it must exist), else g++ or c++ on
    PATH. ``what`` and ``instead`` word the error (what needs it, what to use without one)."""
    requested = os.environ.get("CXX")
    cxx = shutil.which(requested) if requested else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        missing = (
            f"$CXX={requested!r} is not an executable" if requested else "no g++ or c++ on PATH"
        )
        raise KernelBuildError(
            f"{what} builds its kernel with a C++ compiler, and there is none ({missing}): "
            f"install one (Debian/Ubuntu: apt install g++){' or ' + instead if instead else ''}"
        )
    return cxx


def compile_flags() -> tuple[str, ...]:
    """The kernels' compiler flags (-march from $FWI_JAX_KERNEL_ARCH, default native)."""
    return (*FLAGS, f"-march={os.environ.get('FWI_JAX_KERNEL_ARCH', 'native')}")


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


@dataclasses.dataclass(frozen=True)
class CpuKernel:
    """One source in csrc/: its FFI handler symbols (symbol -> target name), the words its errors
    use, and extra compiler arguments (include and link flags) given by ``extra_args``, a
    function so that a missing library is found out when the kernel is loaded, not imported."""

    source: str
    targets: tuple[tuple[str, str], ...]
    what: str
    instead: str = ""
    extra_args: object = tuple  # () -> tuple[str, ...]; may raise KernelBuildError

    @property
    def path(self) -> Path:
        return CSRC / self.source

    def library_path(self, cxx: str | None = None) -> Path:
        """Where this machine's build is cached (it may not exist yet)."""
        cxx = cxx or find_compiler(self.what, self.instead)
        key = hashlib.sha256()
        parts = (
            self.path.read_bytes(),
            *(h.read_bytes() for h in sorted(CSRC.glob("*.h"))),
            " ".join((*compile_flags(), *self.extra_args())),
            cxx,
            jax.__version__,
            _cpu_id(),
        )
        for part in parts:
            key.update(part if isinstance(part, bytes) else part.encode())
        cache = Path(os.environ.get("FWI_JAX_CACHE") or Path.home() / ".cache" / "fwi_jax")
        return cache / "kernels" / f"{self.path.stem}-{key.hexdigest()[:16]}.so"

    def compile_command(self, cxx: str, output: Path) -> list[str]:
        ffi = f"-I{jax.ffi.include_dir()}"
        return [cxx, *compile_flags(), ffi, str(self.path), *self.extra_args(), "-o", str(output)]

    def _build(self, cxx: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = self.compile_command(cxx, built)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise KernelBuildError(
                    f"building {self.path} failed:\n$ {' '.join(cmd)}\n{done.stderr[-4000:]}"
                )
            os.replace(built, target)  # atomic: a concurrent process sees no file or all of it

    def load(self) -> ctypes.CDLL:
        """Build (once per machine; cached) and load the library, and register its FFI targets
        for the CPU. Raises KernelBuildError where that is impossible."""
        if sys.platform != "linux":
            raise KernelBuildError(
                f"{self.what} is built for Linux only, not {sys.platform}"
                + (f": {self.instead}" if self.instead else "")
            )
        cxx = find_compiler(self.what, self.instead)
        path = self.library_path(cxx)
        if not path.exists():
            print(
                f"fwi_jax: building {self.what} ({self.source}, once per machine) into {path}",
                file=sys.stderr,
                flush=True,
            )
            self._build(cxx, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            raise KernelBuildError(f"cannot load {path}: {err} (delete it to rebuild)") from err
        for symbol, target in self.targets:
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
        return lib
