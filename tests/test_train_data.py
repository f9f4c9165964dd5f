"""The trainer's inputs: the embedded model's first-run conversion (leftovers of a killed one, a cache that cannot take
it) and the data files (encoding, empty, too short, listed twice, held-out split), each failing with a message
naming the config field, before the model is built."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import skip_if_no_device, write_jsonl
from safetensors import SafetensorError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fsdp4bit.train import embedded
from fsdp4bit.train.config import DataConfig, from_dict
from fsdp4bit.train.data import (
    DayPin,
    build_datasets,
    rendered_dates,
    sequences_of,
    templates_render_today_as,
    tokenize_example,
    tokenize_files,
    trained_tokens,
)

REPO = Path(__file__).resolve().parents[1]
CONVERTED = ("config.json", "model.safetensors", "tokenizer_config.json")  # what a converted folder holds


def _tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer in a few lines: one token per word or punctuation run, ``</s>`` as EOS."""
    model = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>")


def _words(path: Path, n: int) -> str:
    """A file of ``n`` one-token words in paragraphs of ten (``n + 1`` tokens with the EOS)."""
    path.write_text(
        "\n\n".join(" ".join("w" * (i < n) for i in range(k, k + 10)).strip() for k in range(0, n, 10)) + "\n"
    )
    return str(path)


# --- the embedded model's conversion --------------------------------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversion without the GGUF: writes the files a converted folder holds; returns the folders converted into."""
    converted: list[Path] = []

    def convert(target: Path) -> None:
        for name in CONVERTED:
            (target / name).write_text("{}")
        converted.append(target)

    monkeypatch.setattr(embedded, "_convert", convert)
    monkeypatch.setattr(embedded, "gguf_location", lambda: (Path("."), "x.gguf"))
    monkeypatch.delenv("FSDP4BIT_CACHE", raising=False)
    return converted


def test_a_killed_conversions_temporary_folder_is_removed(tmp_path: Path, fake_convert: list[Path]) -> None:
    left = tmp_path / f".{embedded.CACHE_NAME}-killed"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 1000)
    final = embedded.ensure_embedded_model(str(tmp_path))
    assert all((final / name).is_file() for name in CONVERTED) and not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [embedded.CACHE_NAME, f"{embedded.CACHE_NAME}.lock"]


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_an_incomplete_cache_folder_is_converted_again(tmp_path: Path, fake_convert: list[Path], missing: str) -> None:
    final = tmp_path / embedded.CACHE_NAME
    final.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name != missing:
            (final / name).write_text("old")
    assert embedded.ensure_embedded_model(str(tmp_path)) == final
    assert len(fake_convert) == 1 and all((final / name).read_text() == "{}" for name in CONVERTED)
    assert embedded.ensure_embedded_model(str(tmp_path)) == final and len(fake_convert) == 1  # once only


def test_a_cache_that_cannot_be_written_names_the_field(tmp_path: Path, fake_convert: list[Path]) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"^model\.cache_dir .*file/cache: converting the embedded model into it"):
        embedded.ensure_embedded_model(str(tmp_path / "file" / "cache"))


def test_a_full_cache_names_the_field_and_leaves_nothing(
    tmp_path: Path, fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(target: Path) -> None:
        (target / "model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(embedded, "_convert", full)
    monkeypatch.setenv("FSDP4BIT_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"^FSDP4BIT_CACHE .*No space left on device.*0\.55 GB"):
        embedded.ensure_embedded_model("~/elsewhere")
    assert [p.name for p in tmp_path.iterdir()] == [f"{embedded.CACHE_NAME}.lock"]


# --- data files -------------------------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin1"))
    cfg = DataConfig([_words(tmp_path / "a.txt", 100)], [str(path)], seq_len=8)
    with pytest.raises(ValueError, match=r"^data\.eval_files: .*latin1\.txt is not UTF-8 text \(.* at byte 3\)"):
        build_datasets(cfg, _tokenizer())


@pytest.mark.parametrize("text", ["", " \n\n\t\n\n\n"])
def test_a_file_without_text_names_the_field(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^data\.train_files: .*empty\.txt holds no text"):
        tokenize_files([str(path)], _tokenizer())


def test_a_byte_order_mark_is_not_a_token(tmp_path: Path) -> None:
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("Hello there.\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    tok = _tokenizer()
    assert torch.equal(tokenize_files([str(marked)], tok), tokenize_files([str(plain)], tok))


@pytest.mark.parametrize("field", ["train_files", "eval_files"])
def test_text_shorter_than_a_sequence_names_the_field(tmp_path: Path, field: str) -> None:
    files = {"train_files": [_words(tmp_path / "long.txt", 200)], "eval_files": [_words(tmp_path / "long2.txt", 200)]}
    files[field] = [_words(tmp_path / "short.txt", 10)]
    with pytest.raises(
        ValueError, match=rf"^data\.{field} hold 11 tokens, too few for one sequence of data\.seq_len=64"
    ):
        build_datasets(DataConfig(**files, seq_len=64), _tokenizer())


@pytest.mark.parametrize(
    ("train", "evals", "message"),
    [
        (["a.txt", "a.txt"], [], r"data\.train_files: .*a\.txt is listed twice"),
        (["a.txt"], ["b.txt", "a.txt"], r"data\.eval_files: .*a\.txt is listed in data\.train_files too"),
    ],
)
def test_a_file_listed_twice_is_refused(tmp_path: Path, train: list, evals: list, message: str) -> None:
    _words(tmp_path / "a.txt", 200)
    _words(tmp_path / "b.txt", 200)
    cfg = DataConfig([str(tmp_path / n) for n in train], [str(tmp_path / n) for n in evals], seq_len=8)
    with pytest.raises(ValueError, match=message):
        build_datasets(cfg, _tokenizer())


def test_the_held_out_fraction(tmp_path: Path) -> None:
    path = _words(tmp_path / "a.txt", 199)  # 200 tokens: 25 sequences of 8
    train, held_out = build_datasets(DataConfig([path], [], eval_fraction=0.0, seq_len=8), _tokenizer())
    assert (len(train), len(held_out)) == (25, 0)  # 0 holds out none (it held out one)
    train, held_out = build_datasets(DataConfig([path], [], eval_fraction=0.1, seq_len=8), _tokenizer())
    assert (len(train), len(held_out)) == (23, 2)
    with pytest.raises(
        ValueError, match=r"give 1 sequences .* data\.eval_fraction=0\.05 of them \(at least one\) leaves none"
    ):
        build_datasets(DataConfig([path], [], eval_fraction=0.05, seq_len=150), _tokenizer())
    with pytest.raises(ValueError, match=r"'data\.eval_fraction' must be > 0 when data\.eval_files is empty"):
        from_dict({"data": {"eval_files": [], "eval_fraction": 0.0}})
    from_dict({"data": {"eval_files": [], "eval_fraction": 0.0}, "train": {"eval_before": False, "eval_after": False}})


# --- JSON Lines examples ------------------------------------------------------------------------------------------

_CHAT = (
    "{% for m in messages %}{% if m.content == 'raise' %}{{ raise_exception('no raise') }}{% endif %}"
    "{{ m.role }} : {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def _vocab_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows the test's words (one id each), with a small chat template."""
    words = ["say", "hi", "hello", "there", "you", "user", "assistant", ":", "today", "29", "Feb", "01", "Mar", "2024"]
    model = Tokenizer(
        models.WordLevel(vocab={"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>")
    tok.chat_template = _CHAT if chat else None
    return tok


def test_jsonl_examples_train_only_their_completions(tmp_path: Path) -> None:
    tok = _vocab_tokenizer()
    ids = tok.convert_tokens_to_ids
    chat = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there"}]
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        {"prompt": "say hi", "completion": "hello there"},
        "",
        {"text": "you say hi"},
        {"messages": chat},
    )
    got = tokenize_files([path], tok)
    prompt = ids(["say", "hi"])
    text = ids(["you", "say", "hi", "</s>"])
    chat_prompt = ids(["user", ":", "say", "hi", "</s>", "assistant", ":"])
    answer = ids(["hello", "there", "</s>"])
    want_ids = prompt + answer + text + chat_prompt + answer
    # a segment's first token is never trained: the text example's "you" would be predicted from the answer before
    want_labels = [-100] * 2 + answer + [-100] + text[1:] + [-100] * 7 + answer
    want_positions = [*range(5), *range(4), *range(10)]
    assert got.tolist() == [want_ids, want_labels, want_positions]
    train, _ = build_datasets(DataConfig([path], [], eval_fraction=0.0, seq_len=4), tok)
    assert train.shape == (4, 3, 4)  # 19 tokens: 4 sequences, the last 3 tokens dropped
    assert train[:, 0].flatten().tolist() == want_ids[:16] and train[:, 1].flatten().tolist() == want_labels[:16]
    # positions restart at each example and at each sequence (an example cut by it goes on from 0)
    assert train[:, 2].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 2], [0, 1, 2, 3]]


def test_multi_turn_chats_train_the_last_or_every_assistant_message(tmp_path: Path) -> None:
    """data.chat_loss: "last" trains the last assistant message (earlier ones are context), "assistant" every
    assistant message after the first message (the ids are the same here; a byte-level tokenizer may merge
    characters across a cut otherwise). A template that renders an earlier turn otherwise once later messages follow
    cannot be cut at each turn, and says which message; one whose generation prompt is not how it renders the
    answer's start cannot tell the answer apart in either mode."""
    tok = _vocab_tokenizer()
    ids = tok.convert_tokens_to_ids
    chat = [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "you say hi"},
        {"role": "assistant", "content": "hello there"},
    ]
    first, second = ids(["hello", "</s>"]), ids(["hello", "there", "</s>"])
    want_ids = ids(["user", ":", "say", "hi", "</s>", "assistant", ":"]) + first
    want_ids += ids(["user", ":", "you", "say", "hi", "</s>", "assistant", ":"]) + second
    last = tokenize_example({"messages": chat}, tok)
    every = tokenize_example({"messages": chat}, tok, "assistant")
    assert last[0] == every[0] == want_ids
    assert last[1] == [-100] * 17 + second
    assert every[1] == [-100] * 7 + first + [-100] * 8 + second
    # an assistant message first has nothing before it to prompt it: context
    opening = [{"role": "assistant", "content": "hi"}, *chat]
    assert tokenize_example({"messages": opening}, tok, "assistant")[1][:5] == [-100] * 5
    path = write_jsonl(tmp_path / "chat.jsonl", {"messages": chat})
    trained = [
        trained_tokens(build_datasets(DataConfig([path], [], eval_fraction=0.0, seq_len=5, chat_loss=m), tok)[0])
        for m in ("last", "assistant")
    ]
    assert trained == [3, 5]
    # a template that shortens earlier answers once the chat goes on (as some drop earlier reasoning)
    tok.chat_template = _CHAT.replace(
        "{{ m.role }} : {{ m.content }} </s> ",
        "{% if m.role == 'assistant' and not loop.last %}assistant : hi </s> "
        "{% else %}{{ m.role }} : {{ m.content }} </s> {% endif %}",
    )
    assert tokenize_example({"messages": chat}, tok)[1][-3:] == second
    with pytest.raises(ValueError, match=r"renders message 1 otherwise once the chat goes on .* \"last\" trains"):
        tokenize_example({"messages": chat}, tok, "assistant")
    # a finished chat ending with EOS (Phi-3): not after a turn the chat goes on from, so trained at the end only
    tok.chat_template = _CHAT.replace("assistant :{% endif %}", "assistant :{% else %}{{ eos_token }}{% endif %}")
    phi = tokenize_example({"messages": chat}, tok, "assistant")
    assert phi[0] == want_ids + ids(["</s>"])
    assert phi[1] == [-100] * 7 + first + [-100] * 8 + second + ids(["</s>"])
    # a generation prompt that is not the start of the answer's rendering
    tok.chat_template = _CHAT.replace("assistant :{% endif %}", "assistant ::{% endif %}")
    for mode, message in (("last", 3), ("assistant", 1)):
        with pytest.raises(ValueError, match=rf"renders the chat before message {message} \(with the generation"):
            tokenize_example({"messages": chat}, tok, mode)


def test_without_packing_each_example_has_a_sequence_of_its_own(tmp_path: Path) -> None:
    tok = _vocab_tokenizer()
    ids = tok.convert_tokens_to_ids
    text = tmp_path / "a.txt"
    text.write_text("you say hi you say hi")
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        {"prompt": "say hi", "completion": "hello there"},
        {"prompt": "say", "completion": "hi hi hi hi hi hi"},
    )
    with pytest.warns(UserWarning, match=r"^data\.train_files: 1 of 2 examples are longer than data\.seq_len=6 and"):
        got = sequences_of([path, str(text)], tok, 6, packing=False)
    eos = ids(["</s>"])
    assert got.shape == (3, 3, 6)
    assert got[0].tolist() == [
        ids(["say", "hi", "hello", "there"]) + eos + eos,
        [-100, -100, *ids(["hello", "there"]), *eos, -100],
        list(range(6)),  # the padding goes on counting: no second segment
    ]
    assert got[1].tolist() == [ids(["say"]) + ids(["hi"]) * 5, [-100] + ids(["hi"]) * 5, list(range(6))]  # cut
    assert got[2, 0].tolist() == ids(["you", "say", "hi", "you", "say", "hi"])  # text is packed (its EOS dropped)
    assert got[2, 1].tolist() == [-100, *got[2, 0, 1:].tolist()] and got[2, 2].tolist() == list(range(6))
    packed = sequences_of([path, str(text)], tok, 6, packing=True)
    assert packed.shape == (3, 3, 6) and packed[0, 0].tolist() == ids(["say", "hi", "hello", "there", "</s>", "say"])
    assert packed[0, 2].tolist() == [0, 1, 2, 3, 4, 0]


def test_data_without_a_trained_token_is_refused(tmp_path: Path) -> None:
    """One-token examples train nothing (a segment's first token is never trained): a config error, not a run whose
    every step is skipped."""
    path = write_jsonl(tmp_path / "one.jsonl", *[{"text": ""}] * 8)  # each example is its EOS alone
    with pytest.raises(ValueError, match=r"^data\.train_files hold no trained token \(an example's first token"):
        build_datasets(DataConfig([path], [], eval_fraction=0.0, seq_len=4), _vocab_tokenizer())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_score_as_if_each_were_alone(tmp_path: Path, attention: str, device: str) -> None:
    """Three examples packed into one sequence against each in a sequence of its own: the summed loss and every
    trained token's count must agree, so no example sees another (attention across the boundaries, or the first
    token of one predicted from the end of the one before, changes the packed loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fsdp4bit.train.data import trained_tokens
    from fsdp4bit.train.loss import token_nll

    skip_if_no_device(device)
    tok = _vocab_tokenizer(chat=True)
    chat = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there you"}]
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        {"prompt": "say hi you", "completion": "hello there"},
        {"text": "you say hi there"},
        {"messages": chat},
    )
    alone = sequences_of([path], tok, 16, packing=False)
    length = tokenize_files([path], tok).shape[-1]
    packed = sequences_of([path], tok, length, packing=True)
    assert packed.shape == (1, 3, length) and trained_tokens(packed) == trained_tokens(alone) == 3 + 4 + 4
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.5,  # peaked attention: what a token attends to shows in the loss
    )
    config._attn_implementation = attention
    model = LlamaForCausalLM(config).train().to(device)  # use_cache stays True: token_nll turns it off
    packed, alone = packed.to(device), alone.to(device)
    with torch.no_grad():
        got = token_nll(model, packed)
        want = token_nll(model, alone)
        counting = torch.stack([packed[:, 0], packed[:, 1], torch.arange(length, device=device).expand(1, -1)], 1)
        crossing = token_nll(model, counting)  # positions counting on: one causal sequence
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossing, want, rtol=1e-2), (crossing, want)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"line 2 is not JSON \("),
        ("[1, 2]", r"line 2 is not a JSON object"),
        (
            {"prompt": "say hi"},
            r"line 2: an example holds \"text\", \"prompt\" and \"completion\", or \"messages\", got keys \['prompt'\]",
        ),
        ({"text": 3}, r'line 2: "text" must be a string, got int'),
        ({"messages": []}, r'line 2: "messages" must be a non-empty list'),
        ({"messages": [{"role": "assistant", "content": 3}]}, r'line 2: message 0 of "messages" needs a string'),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "raise"}]},
            r"line 2: the tokenizer's chat template refuses it: TemplateError: no raise",
        ),
        ('{"text": "one\u2028two"}\n{"text": "hi"}\n[]', r"line 4 is not a JSON object"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"line 2: the last of \"messages\" must be the assistant's .* got role 'user'",
        ),
    ],
)
def test_a_bad_jsonl_example_names_the_field_and_line(tmp_path: Path, line: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", {"text": "hi"}, line)
    with pytest.raises(ValueError, match=r"^data\.train_files: .*bad\.jsonl " + message):
        tokenize_files([path], _vocab_tokenizer())


def test_a_json_file_holds_a_list_of_examples(tmp_path: Path) -> None:
    """A ``.json`` file holds the examples as one list (Alpaca-style datasets, ``Dataset.to_json(lines=False)``), or
    one per line (``Dataset.to_json``'s default): the same sequences as the same examples in a ``.jsonl`` file. What
    is not an example object is named."""
    tok = _vocab_tokenizer()
    examples = [
        {"prompt": "say hi", "completion": "hello there"},
        {"text": "you say hi"},
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    want = tokenize_files([write_jsonl(tmp_path / "lines.jsonl", *examples)], tok)
    assert want[1].ne(-100).any() and want[1].eq(-100).any()  # read as examples, not text
    listed = tmp_path / "examples.JSON"
    for content in (json.dumps(examples, indent=2), "\n".join(json.dumps(e) for e in examples) + "\n"):
        listed.write_text(content)
        assert torch.equal(tokenize_files([str(listed)], tok), want)
    for content, message in (
        ([{"text": "hi"}, ["hi"]], r"examples\.JSON example 2 is not a JSON object"),
        ([{"text": "hi"}, {"txt": "hi"}], r"examples\.JSON example 2: an example holds \"text\""),
        ([], r"examples\.JSON holds no examples"),
    ):
        listed.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=r"^data\.train_files: .*" + message):
            tokenize_files([str(listed)], tok)
    listed.write_text(json.dumps({"train": examples}, indent=2))
    with pytest.raises(ValueError, match=r"examples\.JSON holds one JSON object, not a list of examples nor one"):
        tokenize_files([str(listed)], tok)
    listed.write_text('[{"text": "hi"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"examples\.JSON is not JSON \(Expecting value, line 2 column 11\)"):
        tokenize_files([str(listed)], tok)


def test_chat_examples_need_a_chat_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", {"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError, match=r"line 1: \"messages\" need a chat template"):
        tokenize_files([path], _vocab_tokenizer(chat=False))
    with pytest.raises(ValueError, match=r"^data\.eval_files: .*empty\.jsonl holds no examples"):
        tokenize_files([write_jsonl(tmp_path / "empty.jsonl", "", " ")], _vocab_tokenizer(), "data.eval_files")


# Llama 3's templates write the day into every prompt ("Today Date: 26 Jul 2024"), read with strftime_now
_DATED_CHAT = "today {{ strftime_now('%d %b %Y') }} </s> " + _CHAT


def test_chat_templates_render_the_runs_day(tmp_path: Path) -> None:
    """A template reading the clock made the same data other tokens on another day: a resume, or a rank started after
    midnight, trained other sequences. build_datasets renders the day it is given, and only while building."""
    tok = _vocab_tokenizer()
    tok.chat_template = _DATED_CHAT
    chat = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there"}]
    cfg = DataConfig([write_jsonl(tmp_path / "chat.jsonl", {"messages": chat})], [], eval_fraction=0.0, seq_len=5)
    leap, next_day = build_datasets(cfg, tok, "2024-02-29")[0], build_datasets(cfg, tok, "2024-03-01")[0]
    assert leap[0, 0, :4].tolist() == tok.convert_tokens_to_ids(["today", "29", "Feb", "2024"])
    assert next_day[0, 0, :4].tolist() == tok.convert_tokens_to_ids(["today", "01", "Mar", "2024"])
    assert torch.equal(build_datasets(cfg, tok, "2024-02-29")[0], leap)
    before = datetime.date.today()
    rendered = tok.apply_chat_template(chat, tokenize=False)  # the clock's day again
    assert rendered.startswith(tuple(f"today {day:%d %b %Y} " for day in (before, datetime.date.today())))
    outer, inner = DayPin("2024-02-29"), DayPin("2024-03-01")
    with templates_render_today_as(outer, tok):
        assert tok.apply_chat_template(chat, tokenize=False).startswith("today 29 Feb 2024 </s> user")
        with templates_render_today_as(inner, tok):  # nested: the inner day
            assert tok.apply_chat_template(chat, tokenize=False).startswith("today 01 Mar 2024 ")
        assert tok.apply_chat_template(chat, tokenize=False).startswith("today 29 Feb 2024 ")
    assert outer.read and inner.read
    # whether the day changed what was built: a resume on another day says so only then
    assert rendered_dates()
    tok.chat_template = _CHAT
    build_datasets(cfg, tok, "2024-02-29")
    assert not rendered_dates()


def test_a_resumed_run_renders_the_day_its_checkpoint_kept(tmp_path: Path) -> None:
    """data.chat_date, else the newest checkpoint's day (a resume tokenises the chats the stopped run trained on),
    else today. The day is written into each checkpoint: see test_train_loop's run stopped during an evaluation."""
    from fsdp4bit.train.train_checkpoint import PROGRESS_FILE, chat_date_of_run

    def today_either_side(cfg: object) -> bool:
        before = datetime.date.today().isoformat()
        return chat_date_of_run(cfg) in (before, datetime.date.today().isoformat())

    cfg = from_dict({"output": {"dir": str(tmp_path)}})
    assert today_either_side(cfg)
    for step, kept in ((4, "2024-02-29"), (2, "2023-01-01")):
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, "chat_date": kept}))
        (folder / ".metadata").write_text("")
    assert chat_date_of_run(cfg) == "2024-02-29"  # the newest
    cfg.data.chat_date = "2025-12-31"
    assert chat_date_of_run(cfg) == "2025-12-31"
    cfg.data.chat_date, cfg.checkpoint.resume = "", False
    assert today_either_side(cfg)
    cfg.checkpoint.resume = True
    (tmp_path / "checkpoints" / "step-00000004" / PROGRESS_FILE).write_text(json.dumps({"step": 4}))  # written before
    assert today_either_side(cfg)
    (tmp_path / "checkpoints" / "step-00000004" / PROGRESS_FILE).write_text('{"step": 4,')
    with pytest.raises(ValueError, match=r"^cannot read .*step-00000004/progress\.json: JSONDecodeError"):
        chat_date_of_run(cfg)


def test_datasets_are_built_once_per_process(tmp_path: Path) -> None:
    path = Path(_words(tmp_path / "a.txt", 199))
    cfg, tok = DataConfig([str(path)], [], seq_len=8), _tokenizer()
    first = build_datasets(cfg, tok)
    again = build_datasets(cfg, tok)  # the command line checks, then the run builds
    assert again[0] is first[0] and again[1] is first[1]
    path.write_text(path.read_text() * 2)
    assert len(build_datasets(cfg, tok)[0]) > len(first[0])  # a changed file is read again


def test_cli_checks_the_data_before_building_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _tokenizer().save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights: never built
    train = _words(tmp_path / "train.txt", 199)  # 200 tokens: 3 sequences of 64, one held out
    (tmp_path / "blank.txt").write_text("\n\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = tmp_path / "run"
    cases = [
        (["data.train_files=['blank.txt']"], r"data\.train_files: .*blank\.txt holds no text"),
        (
            ["train.micro_batch_size=3"],
            r"give 2 training sequences of data\.seq_len=64, fewer than one global micro-batch",
        ),
    ]
    for overrides, message in cases:
        args = ["--set", f"model.path={model}", "--set", f"data.train_files=['{train}']", "--set", "data.seq_len=64"]
        args += ["--set", "data.eval_files=[]", "--set", "data.eval_fraction=0.1", "--set", f"output.dir={out}"]
        for text in overrides:
            args += ["--set", text]
        proc = subprocess.run(
            [sys.executable, "-m", "fsdp4bit.train", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "fsdp4bit-train: config error: " in proc.stderr, proc.stderr[-2000:]
        assert re.search(message, proc.stderr), proc.stderr
        assert not out.exists()
