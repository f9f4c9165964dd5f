"""Stage bitsandbytes and torchao for a GPU machine with no network, for ``bench/kernels.py``'s same-run columns.

Downloads the two wheels here (``pip download --no-deps``) and unpacks them into one folder small enough to carry
(the device tool carries 64 MiB): bitsandbytes keeps only its CPU library and the CUDA library of ``--cuda`` (the
GPU's torch.version.cuda without the dot), since the full wheel holds one per CUDA and ROCm release. Neither is a
dependency of fsdp4bit; they only sit on PYTHONPATH for the benchmark:

    python bench/incumbents.py --cuda 130 --to bench/tmp/pkgs
    PYTHONPATH=bench/tmp/pkgs:. python bench/kernels.py     # on the GPU machine
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def stage(spec: str, dest: Path, keep_lib) -> None:
    """Download ``spec``'s wheel and unpack it into ``dest``, leaving out the shared libraries ``keep_lib`` refuses."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith(".so") and not keep_lib(name):
                    continue
                z.extract(name, dest)
        print(f"staged {wheel.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", default="130", help="CUDA release of the GPU machine's torch, e.g. 130 for 13.0")
    parser.add_argument("--to", default="bench/tmp/pkgs", help="folder to unpack into")
    parser.add_argument("--bitsandbytes", default="bitsandbytes==0.50.2")
    parser.add_argument("--torchao", default="torchao==0.18.0")
    args = parser.parse_args()
    dest = Path(args.to)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = (f"libbitsandbytes_cuda{args.cuda}.so", "libbitsandbytes_cpu.so")
    stage(args.bitsandbytes, dest, lambda name: "libbitsandbytes" not in name or name.endswith(wanted))
    stage(args.torchao, dest, lambda name: True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
