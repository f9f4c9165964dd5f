"""Instruction counts of the fused GEMM's 256-token bf16 plain kernels, one per lookup variant of
gemm_prmt_lookup.patch (0: the shuffle kernel), in the built extension's SASS:
python3 bench/experiments/sass_counts.py EXTENSION.so"""

import collections
import re
import subprocess
import sys

sass = subprocess.run(["cuobjdump", "-sass", sys.argv[1]], capture_output=True, text=True, check=True).stdout
for body in re.split(r"\n\s*Function : ", sass)[1:]:
    name = body.split("\n", 1)[0]
    look = re.search(r"Li256ELi1ELb0ELi(\d)E", name)
    if "gemm_4bit_kernel" not in name or "bfloat16" not in name or look is None:
        continue
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", body))
    keys = ["PRMT", "SHFL", "FMUL", "F2FP", "HMUL2", "LOP3", "SHF", "LDS", "HGMMA", "IMAD", "IADD3", "BAR", "SYNCS"]
    print("lookup variant", look.group(1), "total", sum(ops.values()), {k: ops[k] for k in keys if ops[k]})
