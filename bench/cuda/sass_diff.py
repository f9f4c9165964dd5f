"""Compare the SASS of two builds of a CUDA file, function by function (needs nvdisasm).

The row kernels' speed moves with ptxas' scheduling (NOTES.md), so a change meant to leave a kernel alone is checked
here before it is timed: each function of the two cubins is listed as identical (branch labels aside), identical but for
register numbers, or different (with the opcodes whose counts differ).

    nvcc -gencode=arch=compute_90a,code=sm_90a -std=c++17 --expt-relaxed-constexpr -O3 -DFSDP4BIT_WGMMA \\
        -I <variant folder> -I csrc/cuda -I <torch includes> -cubin <file>.cu -o a.cubin    (and b.cubin)
    python bench/cuda/sass_diff.py a.cubin b.cubin [--match REGEX] [--nvdisasm PATH]

A .cu file inside csrc/cuda includes its own folder's headers first: copy it beside a variant header to build that.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys


def functions(cubin: str, nvdisasm: str) -> dict[str, list[str]]:
    """Function name -> its instructions (text without addresses or encodings)."""
    text = subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"\s*\.text\.(\S+):", line)
        if head:
            current = head.group(1)
            out[current] = []
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins and current is not None:
            out[current].append(re.sub(r"\s+", " ", ins.group(1)))
    return out


def unlabelled(ins: list[str]) -> list[str]:
    """Branch labels replaced by a placeholder (nvdisasm numbers them across the whole file)."""
    return [re.sub(r"\.L_x_\d+", "L", i) for i in ins]


def renumbered(ins: list[str]) -> list[str]:
    """Registers, predicates and labels replaced by placeholders (what a pure renaming changes)."""
    return [re.sub(r"\bU?P\d\b", "P", re.sub(r"\bU?R\d+\b", "R", i)) for i in unlabelled(ins)]


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--match", default="", help="only functions whose mangled name matches this regex")
    parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    args = parser.parse_args()
    fa, fb = functions(args.a, args.nvdisasm), functions(args.b, args.nvdisasm)
    counts: collections.Counter[str] = collections.Counter()
    for name in sorted(set(fa) | set(fb)):
        if not re.search(args.match, name):
            continue
        a, b = fa.get(name), fb.get(name)
        if a is None or b is None:
            verdict = f"only in {args.a if b is None else args.b}"
        elif unlabelled(a) == unlabelled(b):
            verdict = "identical"
        elif renumbered(a) == renumbered(b):
            verdict = "identical but for register numbers"
        else:
            ca, cb = collections.Counter(map(opcode, a)), collections.Counter(map(opcode, b))
            diff = {o: (ca[o], cb[o]) for o in sorted(set(ca) | set(cb)) if ca[o] != cb[o]}
            verdict = f"differs: {len(a)} vs {len(b)} instructions" + (
                f", opcode counts {diff}" if diff else ", reordered"
            )
        counts[verdict.split(":")[0]] += 1
        print(f"{name[:110]}: {verdict}")
    print(dict(counts), file=sys.stderr)


if __name__ == "__main__":
    main()
