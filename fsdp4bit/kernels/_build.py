"""Builds the native extensions in csrc/ on first use, with torch.utils.cpp_extension.load (ninja).

Why on first use: the CPU build is tuned for the CPU it runs on (-march=native) and the CUDA build for the
GPUs present (one -gencode per compute capability), so no wheel has to carry binaries for every target.
Builds are cached under ``$FSDP4BIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fsdp4bit`` or ``~/.cache/fsdp4bit``)
in a folder keyed by a hash of the sources (and their paths), the flags, the torch version, the compiler and
the target (CPU feature flags or GPU archs), so a cache shared between different machines never hands out a
binary built for another CPU. Concurrent builds (e.g. several ranks at once) are serialised by an OS file lock that
dies with its process; torch's own lock file, which a killed build leaves behind and torch then waits on
forever, is removed while that lock is held (see ``exclusive_build``). A cut-off cached library is removed
before loading (ninja links it again); a cache folder this process cannot write is only read from. A build that
fails is recorded in its folder, so the processes that waited for it fail with its reason instead of building again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

# the kernels' sources: csrc/ of a checkout (editable install), or the copy a wheel carries (setup.py)
_PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "_csrc"
CSRC = _PACKAGED_CSRC if _PACKAGED_CSRC.is_dir() else Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = (CSRC / "cpu" / "fsdp4bit_cpu.cpp", CSRC / "cpu" / "operators.cpp")
CPU_HEADERS = (CSRC / "cpu" / "host_ops.h", CSRC / "common" / "operators.h")
CUDA_SOURCES = tuple(
    CSRC / "cuda" / name
    for name in (
        "bindings.cpp",
        "operators.cpp",
        "quantize.cu",
        "quantize_f32.cu",
        "quantize_f16.cu",
        "quantize_bf16.cu",
        "dequantize.cu",
        "blockwise.cu",
        "gemv.cu",
        "gemv_f32.cu",
        "gemv_f16.cu",
        "gemv_bf16.cu",
        "gemv_tma.cu",
        "gemv_lut.cu",
        "gemv_row.cu",
        "gemm.cu",
    )
)
CUDA_HEADERS = tuple(
    CSRC / "cuda" / h
    for h in (
        "async_copy.cuh",
        "common.cuh",
        "dequantize.cuh",
        "gemm.cuh",
        "gemv.cuh",
        "gemv_lut.cuh",
        "gemv_row.cuh",
        "host_ops.h",
        "gemv_tma.cuh",
        "quantize.cuh",
        "launch.h",
    )
) + (CSRC / "common" / "operators.h",)

# -ffp-contract=off: a fused multiply-add would round differently from the reference's separate ops.
# No -std flag: cpp_extension passes the C++ standard torch itself was built with (C++20 for torch >= 2.10);
# a -std=c++17 here used to override it, compiling torch's headers in another language mode than libtorch.
_CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
_CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


# A toolchain that links libstdc++ statically (the GPU image's CXX does) would put a second copy of it in
# the extension whose symbols interpose with torch's shared one; the first TORCH_CHECK message formatted
# there then crashed (SIGSEGV in a locale facet). Keeping every static archive's symbols local avoids that
# and changes nothing when libstdc++ is linked dynamically.
_LDFLAGS = ["-Wl,--exclude-libs,ALL"] if platform.system() == "Linux" else []


class BuildError(RuntimeError):
    """The extension could not be built; the message says why and what to install."""


def _cache_root() -> Path:
    """The cache folder of all builds; BuildError where no home folder is known (HOME unset, no passwd entry)."""
    env = os.environ.get("FSDP4BIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "fsdp4bit"
    try:
        return Path.home() / ".cache" / "fsdp4bit"
    except RuntimeError as exc:  # Path.home(): "Could not determine home directory."
        raise BuildError(f"no build cache folder ({exc}): set FSDP4BIT_CACHE_DIR to a writable folder") from exc


def _cpu_target() -> tuple[list[str], str]:
    """(arch flags, target id): -march=native on x86-64, keyed by the CPU's feature flags."""
    machine = platform.machine().lower()
    flags: list[str] = []
    ident = machine
    if machine in ("x86_64", "amd64"):
        flags = ["-march=native"]
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    ident += ":" + line.split(":", 1)[1].strip()
                    break
        except OSError:
            flags = []  # unknown CPU: stay portable
    return flags, ident


def _compiler_version(cmd: str) -> str:
    """The first line of ``cmd --version``; "" where it fails (a compiler that does not run)."""
    try:
        proc = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=30)
        return proc.stdout.splitlines()[0] if proc.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def _key(sources: tuple[Path, ...], *parts: str) -> str:
    """Cache key of a build: the sources' bytes and paths (ninja rebuilds when a command names other paths, so
    two checkouts sharing one cache would rebuild each other's extension on every load), the flags, torch."""
    missing = [str(src) for src in sources if not src.is_file()]
    if missing:
        raise BuildError(
            f"the C++/CUDA sources are not installed ({missing[0]} is missing): reinstall fsdp4bit (a wheel "
            "carries them in fsdp4bit/_csrc, an editable install `pip install -e .` reads csrc/ in the checkout)"
        )
    h = hashlib.sha256()
    for src in sources:
        h.update(str(src).encode())
        h.update(src.read_bytes())
    for part in (torch.__version__, sys.version, *parts):
        h.update(part.encode())
    return h.hexdigest()[:16]


# flock's errors where the file system has no such locks (rather than a lock held elsewhere)
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` (waiting for it); False where the file system has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        return False
    return True


@contextlib.contextmanager
def exclusive_build(build_dir: Path) -> Iterator[bool]:
    """Hold an exclusive OS lock on ``build_dir`` (released by the kernel if the process dies) and remove
    torch's ``lock`` file there: with the OS lock held no other fsdp4bit build runs in this folder, so that
    file is left over from a killed build, and torch's ``cpp_extension.load`` would wait for it forever. Yields
    whether the lock is held (False where there is no flock: another process may be building right now)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield False
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "fsdp4bit.flock", "a+") as handle:
        if not _flock(handle.fileno()):
            yield False  # a file system without flock (Lustre without -o flock, some NFS mounts): torch's lock only
            return
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_dir(name: str, key: str) -> Path:
    """The cache folder of extension ``name`` built with ``key``."""
    return _cache_root() / f"{name}_{key}"


def library_path(name: str, key: str) -> Path:
    """The built extension file that ``cpp_extension.load`` writes and imports for ``name`` and ``key``."""
    from torch.utils.cpp_extension import LIB_EXT

    return build_dir(name, key) / f"{name}_{key}{LIB_EXT}"


def _elf_is_truncated(path: Path) -> bool:
    """True when ``path`` is not an ELF file or is a 64-bit one shorter than its headers say (a cut-off copy, or a
    link that ended early): loading one killed the process with SIGBUS, or failed in every later process."""
    with open(path, "rb") as f:
        head = f.read(64)
        size = os.fstat(f.fileno()).st_size
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return True
        if head[4] != 2 or head[5] not in (1, 2):  # 32-bit or unknown byte order: left to the loader
            return False
        order = "<" if head[5] == 1 else ">"
        phoff, shoff = struct.unpack_from(order + "QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 0x36)
        if max(phoff + phnum * phentsize, shoff + shnum * shentsize) > size:
            return True
        f.seek(phoff)
        table = f.read(phnum * phentsize) if phentsize >= 0x28 else b""
    # each program header's segment: p_offset at +0x08, p_filesz at +0x20
    ends = (
        struct.unpack_from(order + "Q", table, i + 8)[0] + struct.unpack_from(order + "Q", table, i + 0x20)[0]
        for i in range(0, len(table), phentsize)
    )
    return max(ends, default=0) > size


def _drop_truncated(library: Path) -> None:
    """Remove a truncated build of ``library`` (under the build lock) so ninja links it again."""
    if sys.platform.startswith("linux") and library.is_file() and _elf_is_truncated(library):
        library.unlink()


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and can be written to (a read-only cache may still hold a build)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _load_prebuilt(library: Path) -> ModuleType:
    """Import ``library`` from a cache folder this process cannot write (read-only file system, another owner):
    its name carries the key of the sources, flags, torch, compiler and target, so it is this build."""
    if not library.is_file() or (sys.platform.startswith("linux") and _elf_is_truncated(library)):
        raise BuildError(
            f"the build cache folder {library.parent} is not writable and holds no complete build of this "
            "version: set FSDP4BIT_CACHE_DIR to a writable folder"
        )
    spec = importlib.util.spec_from_file_location(library.stem, library)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import the built extension {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a failed build's record in its folder: the failure's message
_FAILED = "fsdp4bit.failed"


def _record_id(record: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of the failure record, None where there is none: a new record replaces the file
    (os.replace), so a change of this id while a process waited means a build failed meanwhile (no clocks compared,
    so a cache shared by hosts with skewed clocks is judged the same way)."""
    try:
        st = record.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _raise_if_failed_while_waiting(record: Path, before: tuple[int, int, int] | None) -> None:
    """BuildError with the recorded reason when a build in this folder failed while this process waited for the
    lock (the record changed since ``before``): the ranks of one launch then fall back together instead of each
    building again in turn (minutes per rank for the CUDA extension). An older record is ignored: a later run builds
    again."""
    now = _record_id(record)
    if now is None or now == before:
        return
    try:
        reason = record.read_text(errors="replace")
    except OSError:
        return
    raise BuildError(f"the same build failed in another process while this one waited for it: {reason}")


def _record_failure(record: Path, exc: BaseException) -> None:
    """Write the failure of the build in ``record``'s folder for the processes waiting on its lock."""
    reason = str(exc) if isinstance(exc, BuildError) else f"{type(exc).__name__}: {exc}"
    tmp = record.with_name(f"{record.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_text(reason[-20000:])
        os.replace(tmp, record)


def _load(name: str, sources: tuple[Path, ...], key: str, **kwargs) -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_dir(name, key)
    if not _writable(folder):
        return _load_prebuilt(library_path(name, key))
    verbose = os.environ.get("FSDP4BIT_BUILD_VERBOSE") == "1"
    record = folder / _FAILED
    before = _record_id(record)
    with exclusive_build(folder) as locked:
        if locked:  # without the lock a short library may be one another process is linking right now
            _raise_if_failed_while_waiting(record, before)
            _drop_truncated(library_path(name, key))
        try:
            return cpp_extension.load(
                name=f"{name}_{key}",
                sources=[str(s) for s in sources],
                build_directory=str(folder),
                verbose=verbose,
                **kwargs,
            )
        except Exception as exc:
            if locked:
                _record_failure(record, exc)
            raise


def _check_ninja() -> None:
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise BuildError("ninja is not installed: `pip install ninja`") from exc


def cpu_build() -> tuple[list[str], list[str], str]:
    """(compiler flags, linker flags, cache key) of the CPU extension on this machine."""
    arch, target = _cpu_target()
    cflags = _CPU_CFLAGS + arch
    ldflags = ["-fopenmp", *_LDFLAGS]
    key = _key(
        CPU_SOURCES + CPU_HEADERS, " ".join(cflags + ldflags), target, _compiler_version(os.environ.get("CXX", "c++"))
    )
    return cflags, ldflags, key


def build_cpu() -> tuple[ModuleType, float]:
    """Build (or load from cache) the CPU extension; returns (module, seconds spent)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler found ({cxx!r} is not on PATH): install g++ (e.g. `apt-get install g++`)")
    if not _compiler_version(cxx):
        raise BuildError(f"the C++ compiler {cxx!r} does not run (`{cxx} --version` failed): install g++ or set CXX")
    _check_ninja()
    cflags, ldflags, key = cpu_build()
    t0 = time.perf_counter()
    mod = _load("fsdp4bit_cpu", CPU_SOURCES, key, extra_cflags=cflags, extra_ldflags=ldflags)
    return mod, time.perf_counter() - t0


def cuda_archs() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs, deduplicated and sorted."""
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def cuda_arch_flags(archs: list[tuple[int, int]]) -> tuple[str, list[str]]:
    """(TORCH_CUDA_ARCH_LIST, extra nvcc flags) for ``archs``: compute capability 9.0 builds for sm_90a, whose
    wgmma and setmaxnreg the fused 4-bit GEMM needs (FSDP4BIT_WGMMA tells the host code it is there); an sm_90a
    binary runs on 9.0 only, which is the GPU it is built for."""
    names = [f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in archs]
    return ";".join(names), (["-DFSDP4BIT_WGMMA"] if (9, 0) in archs else [])


def build_cuda() -> tuple[ModuleType, float]:
    """Build (or load from cache) the CUDA extension for the visible GPUs; returns (module, seconds spent)."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise BuildError(f"this torch ({torch.__version__}) was built without CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.exists():
        raise BuildError(
            f"no nvcc found (CUDA_HOME={cuda_home!r}): install the CUDA toolkit {torch.version.cuda} matching "
            f"torch {torch.__version__}, or set CUDA_HOME"
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ host compiler found ({cxx!r}): install g++")
    _check_ninja()
    arch_list, arch_cflags = cuda_arch_flags(cuda_archs())
    cuda_cflags = _CUDA_CFLAGS + arch_cflags
    key = _key(
        CUDA_SOURCES + CUDA_HEADERS,
        " ".join(cuda_cflags + _LDFLAGS),
        arch_list,
        _compiler_version(str(nvcc)),
        _compiler_version(cxx),
        torch.version.cuda,
    )
    # cpp_extension turns TORCH_CUDA_ARCH_LIST into one -gencode=arch=compute_XY,code=sm_XY per entry (XYa for 9.0a).
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    t0 = time.perf_counter()
    try:
        mod = _load(
            "fsdp4bit_cuda",
            CUDA_SOURCES,
            key,
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=_LDFLAGS,
            with_cuda=True,
        )
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return mod, time.perf_counter() - t0
