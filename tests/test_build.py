"""First-use build and cache of the native extensions (fsdp4bit/kernels/_build.py) and the launcher scripts.

Most tests drive the cache logic with a stand-in for ``cpp_extension.load``; one reuses the CPU build that
the kernel tests make (a copy of its cache folder), so no test here compiles the extension.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fsdp4bit import kernels
from fsdp4bit.kernels import _build

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty FSDP4BIT_CACHE_DIR."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FSDP4BIT_CACHE_DIR", str(root))
    return root


def _fake_load(calls: list[dict]):
    """A stand-in for ``cpp_extension.load`` that records its arguments and whether the library was there."""

    def load(name, sources, build_directory, **kwargs):
        library = Path(build_directory) / f"{name}.so"
        calls.append({"name": name, "library_there": library.exists()})
        return "loaded"

    return load


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries")
def test_truncated_cached_library_is_linked_again(cache, monkeypatch):
    """A cut-off cached .so (a partial copy of a cache, a full disk) killed every process that loaded it with
    SIGBUS, or failed in each one: it is removed under the build lock, so ninja links it again."""
    from torch.utils import cpp_extension

    calls: list[dict] = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(calls))
    library = cache / "fsdp4bit_cpu_k" / "fsdp4bit_cpu_k.so"
    library.parent.mkdir(parents=True)
    full = Path(torch._C.__file__).read_bytes()
    for cut in (0, 100, 4096, len(full) // 2):
        library.write_bytes(full[:cut])
        assert _build._load("fsdp4bit_cpu", (), "k") == "loaded"
        assert calls[-1] == {"name": "fsdp4bit_cpu_k", "library_there": False}, cut
    library.write_bytes(full)  # a complete library stays
    _build._load("fsdp4bit_cpu", (), "k")
    assert calls[-1]["library_there"] and library.read_bytes() == full


_LOAD_TRUNCATED = """
import sys
from fsdp4bit.kernels import backend_name
print(backend_name("cpu"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries")
def test_truncated_cpu_extension_loads_end_to_end(tmp_path, monkeypatch):
    """End to end in a child process: a copy of the built CPU cache folder with its .so cut in half loads as
    native-cpu (ninja relinks it, seconds); before, the child died of SIGBUS."""
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    if kernels.native_for("cpu") is None:
        pytest.skip("native CPU kernels unavailable (see the build warning)")
    _, _, key = _build.cpu_build()
    folder = _build.build_dir("fsdp4bit_cpu", key)
    copy = tmp_path / "cache with space" / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("lock"))  # copy2: ninja sees the same mtimes
    library = copy / f"fsdp4bit_cpu_{key}.so"
    os.truncate(library, library.stat().st_size // 2)
    env = {**os.environ, "FSDP4BIT_CACHE_DIR": str(copy.parent), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _LOAD_TRUNCATED], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "native-cpu", proc.stderr[-2000:]


def _stdlib_extension() -> Path:
    """A stdlib extension module's shared library, imported under its own name (skip if all are built in)."""
    for name in ("_json", "_struct", "_bisect", "_heapq", "_random"):
        path = getattr(importlib.import_module(name), "__file__", None)
        if path and path.endswith(".so"):
            return Path(path)
    pytest.skip("no stdlib extension module is a shared library in this Python")


def test_read_only_cache_imports_its_build(cache, monkeypatch):
    """A cache folder this process cannot write (a prebuilt cache on a read-only mount) gave the reference path
    (its lock file could not be opened): the build that its key names is imported as it is."""
    from torch.utils import cpp_extension

    source = _stdlib_extension()
    stem = source.name.split(".")[0]  # "_json": name "" and key "json" spell that library's name
    name, key = "", stem[1:]
    library = cache / f"{name}_{key}" / f"{name}_{key}.so"
    library.parent.mkdir(parents=True)
    shutil.copy(source, library)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **kw: pytest.fail("built in a read-only cache"))
    module = _build._load(name, (), key)
    assert module.__name__ == stem and Path(module.__file__) == library


def test_read_only_empty_cache_says_what_to_set(cache, monkeypatch):
    """A read-only cache without this build: a BuildError naming the folder and FSDP4BIT_CACHE_DIR (before, an
    OSError on the lock file, with no advice)."""
    cache.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    with pytest.raises(_build.BuildError, match="not writable.*set FSDP4BIT_CACHE_DIR to a writable folder"):
        _build._load("fsdp4bit_cpu", (), "k")


def test_a_failed_build_is_not_repeated_by_the_processes_that_waited(cache, monkeypatch):
    """Ranks that wait on the build lock while the build fails fall back with its reason instead of each building
    again in turn (minutes per rank for the CUDA extension); a call made after the failure builds again."""
    import threading

    from torch.utils import cpp_extension

    building, second_waits = threading.Event(), threading.Event()
    calls: list[str] = []
    flock = _build._flock

    def flock_noting_the_second(fd: int) -> bool:
        if threading.current_thread().name == "second":
            second_waits.set()  # it has read the record's state and now waits for the lock
        return flock(fd)

    def failing_load(name, **kwargs):
        calls.append(name)
        building.set()
        assert second_waits.wait(10)
        raise RuntimeError("Error building extension 'fsdp4bit_cpu_k': error: 'x' was not declared")

    monkeypatch.setattr(_build, "_flock", flock_noting_the_second)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    errors: dict[str, BaseException] = {}

    def call() -> None:
        try:
            _build._load("fsdp4bit_cpu", (), "k")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions below
            errors[threading.current_thread().name] = exc

    first = threading.Thread(target=call, name="first")
    first.start()
    assert building.wait(10)
    second = threading.Thread(target=call, name="second")
    second.start()
    first.join(10)
    second.join(10)
    assert calls == ["fsdp4bit_cpu_k"]
    assert isinstance(errors["first"], RuntimeError) and "was not declared" in str(errors["first"])
    assert isinstance(errors["second"], _build.BuildError)
    assert "failed in another process while this one waited" in str(errors["second"])
    assert "was not declared" in str(errors["second"])

    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: calls.append(name) or "loaded")
    assert _build._load("fsdp4bit_cpu", (), "k") == "loaded" and len(calls) == 2


def test_file_system_without_flock_still_builds(tmp_path, monkeypatch):
    """flock fails with ENOSYS on Lustre mounted without -o flock (ENOLCK on some NFS mounts): the build goes on
    under torch's own lock (before, the OSError sent every process to the reference path)."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / "lock").write_text("")
    with _build.exclusive_build(tmp_path) as locked:
        entered = True
    # without the OS lock, torch's lock is not known stale (nor is a short library: another process may be linking)
    assert entered and not locked and (tmp_path / "lock").exists()
    monkeypatch.undo()
    with _build.exclusive_build(tmp_path) as locked:
        assert locked and not (tmp_path / "lock").exists()
    monkeypatch.setattr(fcntl, "flock", no_flock)

    def busy(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(OSError, match="Bad file descriptor"), _build.exclusive_build(tmp_path):
        pass


def test_compiler_that_does_not_run(cache, monkeypatch):
    """CXX=/bin/false: a BuildError naming the compiler (was torch's CalledProcessError about `--version`)."""
    if shutil.which("false") is None:
        pytest.skip("no `false` command")
    monkeypatch.setenv("CXX", shutil.which("false"))
    with pytest.raises(_build.BuildError, match=r"the C\+\+ compiler .* does not run .*install g\+\+ or set CXX"):
        _build.build_cpu()


def test_missing_sources_say_how_to_install(tmp_path):
    """Sources missing (an install without them): a BuildError saying how to reinstall (was FileNotFoundError)."""
    with pytest.raises(_build.BuildError, match=r"sources are not installed .*reinstall fsdp4bit"):
        _build._key((tmp_path / "csrc" / "cpu" / "fsdp4bit_cpu.cpp",), "flags")


def test_cache_root_without_home(monkeypatch):
    """No HOME and no passwd entry (a container's arbitrary uid): a BuildError saying to set FSDP4BIT_CACHE_DIR
    (was Path.home()'s bare RuntimeError); a ``~`` in FSDP4BIT_CACHE_DIR is the home folder."""
    for var in ("FSDP4BIT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(_build.BuildError, match="set FSDP4BIT_CACHE_DIR"):
        _build._cache_root()
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("FSDP4BIT_CACHE_DIR", "~/f4b")
    assert _build._cache_root() == Path("/home/someone/f4b")


@pytest.mark.parametrize("value", ["false", "False", "no", "off", " 0"])
def test_no_native_off_words_warn(monkeypatch, value):
    """FSDP4BIT_NO_NATIVE=false forced the reference path without a word (any value but "" or "0" does, in the
    C++ operators too): it still does, and says so once."""
    cache_clear = getattr(kernels, "_warn_off_word", None)
    if cache_clear is not None:
        cache_clear.cache_clear()
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", value)
    with pytest.warns(RuntimeWarning, match="FSDP4BIT_NO_NATIVE=.* forces the plain-PyTorch reference"):
        assert kernels.native_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.native_disabled()  # once per value
        monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
        assert kernels.native_disabled()
        monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "0")
        assert not kernels.native_disabled()


def test_build_failure_warning_keeps_the_compiler_error(monkeypatch):
    """ninja's output starts with long command lines (nvcc's fill 2000 characters alone): the warning kept only
    the first 2000 characters, so the compiler's error at the end was lost. It keeps the first line and the end."""
    command = "[1/3] c++ -MMD -MF x.o.d " + "-isystem /a/long/include/path " * 80 + "-c x.cpp -o x.o\n"
    log = f"Error building extension 'fsdp4bit_cpu_k': {command}FAILED: x.o\n{command}"
    log += "x.cpp:12:3: error: 'missing_thing' was not declared in this scope\nninja: build stopped: subcommand failed."

    def failing_build():
        raise RuntimeError(log)

    monkeypatch.setattr(kernels, "build_cpu", failing_build)
    with pytest.warns(RuntimeWarning) as record:
        assert kernels._build_native("cpu") is None
    (message,) = [str(w.message) for w in record if "native CPU kernels" in str(w.message)]
    assert "Error building extension 'fsdp4bit_cpu_k'" in message
    assert "'missing_thing' was not declared" in message and "build stopped" in message
    assert len(message) < 2400


# ----------------------------------------------------------------------------------------------- launch/train.sh
@pytest.fixture
def fake_torchrun(tmp_path):
    """PATH with a ``torchrun`` that prints its arguments, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "torchrun"
    script.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _train_sh(cwd: Path, path: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": path, **env}
    for var in ("NGPU", "CONFIG"):
        if var not in env:
            full_env.pop(var, None)
    return subprocess.run(
        ["bash", str(REPO / "launch" / "train.sh"), "--set", "train.steps=1"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_train_sh_config_relative_to_the_callers_folder(tmp_path, fake_torchrun):
    """A relative CONFIG from another folder was looked up in the repository root (the script cds there)."""
    work = tmp_path / "my runs"
    work.mkdir()
    (work / "my.toml").write_text("")
    proc = _train_sh(work, fake_torchrun, CONFIG="my.toml", NGPU="1")
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    assert args[args.index("--config") + 1] == str(work / "my.toml")
    assert "--nproc_per_node=1" in args and args[-2:] == ["--set", "train.steps=1"]
    proc = _train_sh(work, fake_torchrun)  # the default, from the repository root
    args = proc.stdout.splitlines()
    assert proc.returncode == 0 and args[args.index("--config") + 1] == "configs/cpu_default.toml"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NGPU": "0"}, "NGPU must be a process count of 1 or more"),
        ({"NGPU": "two"}, "NGPU must be a process count of 1 or more"),
        ({"CONFIG": "missing.toml"}, "CONFIG file not found: missing.toml"),
    ],
)
def test_train_sh_refuses_bad_settings(tmp_path, fake_torchrun, env, message):
    """NGPU=0 gave torchrun's bare AssertionError, a missing CONFIG a failure traceback per rank: exit code 2
    and one line saying which setting is wrong, before torchrun starts."""
    proc = _train_sh(tmp_path, fake_torchrun, **env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == "", (proc.stdout, proc.stderr)


def test_wheel_carries_the_kernel_sources(tmp_path):
    """A non-editable install builds the kernels too: the wheel holds csrc/ as fsdp4bit/_csrc, byte for byte, and
    _build reads that copy where it exists (built from a copy of the project: setuptools writes build/ in place)."""
    import zipfile

    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation needs setuptools in this environment")
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(repo / "fsdp4bit", src / "fsdp4bit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "csrc", src / "csrc")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(repo / name, src / name)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fsdp4bit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = {name.removeprefix("fsdp4bit/_csrc/"): z.read(name) for name in z.namelist() if "/_csrc/" in name}
    sources = {str(p.relative_to(repo / "csrc")): p.read_bytes() for p in (repo / "csrc").rglob("*") if p.is_file()}
    assert packed == sources
    assert {str(p.relative_to(_build.CSRC)) for p in _build.CPU_SOURCES} <= set(packed)
