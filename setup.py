"""setuptools hook: a wheel carries csrc/ (the native kernels' sources, compiled on first use) as fsdp4bit/_csrc,
so a non-editable install (``pip install .``, ``pip install git+...``) builds the kernels too; an editable install
reads csrc/ in the checkout. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """build_py that copies csrc/ into the built package (not for editable installs, which keep the checkout)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "fsdp4bit" / "_csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).resolve().parent / "csrc", target)


setup(cmdclass={"build_py": BuildPyWithSources})
