"""Training data: tokenise, pack into fixed-length sequences, and hand each rank its own micro-batches.

A data file is plain text (every token trained but its first) or examples, one per line in a ``*.jsonl`` file, or in
a ``*.json`` file as a list (or one per line too): ``{"text": ...}`` (every token trained but the first),
``{"prompt": ..., "completion": ...}`` (the loss on the completion and the EOS after it: instruction tuning) or
``{"messages": [...]}`` (a chat rendered with the tokenizer's chat template, the loss on its last message, which
must be the assistant's). Examples are packed one after another into sequences, as text is, or with ``data.packing``
off each goes into a sequence of its own (padded).

A sequence is ``[3, seq_len]``: token ids, labels (the id where the token is trained, else -100) and position ids.
A segment (a text file, an example) starts at position 0, and so does every sequence. Hugging Face models read a
restart of the positions as a packed-sequence boundary and mask attention across it (with no 2D attention mask and
no KV cache), so a packed token attends to its own segment only, as if it were alone. A segment's first token is
never trained: nothing of its own comes before it (the previous segment's last token would otherwise predict it).

The order of training sequences is a pure function of the seed: epoch ``e`` is a permutation drawn from a
generator seeded with ``seed + e``, and each micro-step takes the next ``micro_batch_size * world`` sequences of
that stream, rank ``r`` the ``r``-th ``micro_batch_size`` of them (an epoch ends where a whole micro-step no longer
fits). Ranks never see the same sequence in a step, and resuming needs only the stream position (epoch, offset)
saved in checkpoints, on any world size: a run resumed on other ranks goes on where the old one stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import chat_template_utils

from .config import DataConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100
"""The label of a token the loss skips (a prompt's), as torch's cross_entropy and Hugging Face models take it."""


def resolve_data_file(name: str) -> Path:
    """``name`` as given if it exists, else relative to the repository root (so configs work from any cwd)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    raise FileNotFoundError(f"data file not found: {name} (also looked in {REPO_ROOT})")


def read_text(path: Path, field: str) -> str:
    """The text of a data file (UTF-8, a leading byte-order mark dropped, line endings as ``\\n``); ValueError naming
    ``field`` for other bytes (a decoding error from deep inside would not say which setting to fix)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{field}: {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. with "
            f"iconv -f latin1 -t utf-8"
        ) from None


def tokenize_files(
    files: list[str], tokenizer: PreTrainedTokenizerBase, field: str = "data.train_files", chat_loss: str = "last"
) -> torch.Tensor:
    """All files as one ``[3, L]`` int64 stream of token ids, labels and each token's position in its segment (a
    text file or an example; its first token untrained). A text file's paragraphs are encoded separately and the
    file ends with EOS; a ``.jsonl`` or ``.json`` file's examples follow :func:`tokenize_example`. A file without
    text is a ValueError naming ``field`` (the tokenizer fails on an empty batch)."""
    return _stream(_segments(files, tokenizer, field, chat_loss))


def _stream(segments: list[tuple[list[int], list[int], bool]]) -> torch.Tensor:
    """The ``[3, L]`` int64 stream of ``segments`` (ids, labels, position in the segment), one after another."""
    rows: list[list[int]] = [[], [], []]
    for ids, labels, _ in segments:
        rows[0] += ids
        rows[1] += labels
        rows[2] += range(len(ids))
    return torch.tensor(rows, dtype=torch.long)


def _segments(
    files: list[str], tokenizer: PreTrainedTokenizerBase, field: str, chat_loss: str = "last"
) -> list[tuple[list[int], list[int], bool]]:
    """(ids, labels, is an example) of each text file (one segment) and each example, in order; a
    segment's first token is not trained."""
    out = []
    for name in files:
        path = resolve_data_file(name)
        if holds_examples(path):
            for where, example in _examples(path, field):
                try:
                    out.append((*tokenize_example(example, tokenizer, chat_loss), True))
                except ValueError as err:
                    raise ValueError(f"{field}: {path} {where}: {err}") from None
            continue
        paragraphs = [p + "\n\n" for p in read_text(path, field).split("\n\n") if p.strip()]
        if not paragraphs:
            raise ValueError(f"{field}: {path} holds no text (it is empty or only whitespace)")
        ids = [i for chunk in tokenizer(paragraphs, add_special_tokens=False)["input_ids"] for i in chunk]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        out.append((ids, list(ids), False))
    return [(ids, [IGNORE] * bool(labels) + labels[1:], is_example) for ids, labels, is_example in out]


def sequences_of(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    packing: bool,
    field: str = "data.train_files",
    chat_loss: str = "last",
) -> torch.Tensor:
    """``[n, 3, seq_len]`` sequences of ``field``'s files: everything packed back to back (:func:`pack`), or with
    ``packing`` off each example in a sequence of its own, cut to ``seq_len`` (with a warning saying how
    many were) and padded on the right with the pad (else EOS) id labelled -100 (the padding's positions go on
    counting, so it is no boundary); a text file is then packed on its own. Sequences keep the files' order (the
    held-out fraction is the last)."""
    if packing:
        return pack(tokenize_files(files, tokenizer, field, chat_loss), seq_len, field)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows, cut, examples = [], 0, 0
    for ids, labels, is_example in _segments(files, tokenizer, field, chat_loss):
        if not is_example:
            rows.extend(pack(_stream([(ids, labels, is_example)]), seq_len, field).unbind(0))
            continue
        examples += 1
        cut += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        fill = seq_len - len(ids)
        rows.append(
            torch.tensor([ids + [pad] * fill, labels + [IGNORE] * fill, list(range(seq_len))], dtype=torch.long)
        )
    if cut:
        warnings.warn(
            f"{field}: {cut} of {examples} examples are longer than data.seq_len={seq_len} and were cut to it",
            stacklevel=2,
        )
    return torch.stack(rows)


def holds_examples(path: Path | str) -> bool:
    """Whether a data file holds examples (``*.jsonl``: one per line; ``*.json``: a list of them, or one per line),
    not text."""
    return Path(path).suffix.lower() in (".jsonl", ".json")


def _examples(path: Path, field: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) of every example of a ``.jsonl`` file (each non-blank line: "line 3") or a ``.json`` file (a
    list of objects, as Alpaca-style datasets and ``Dataset.to_json(lines=False)`` write: "example 3", counted from
    1; or, not starting with "[", JSON Lines, as ``Dataset.to_json`` writes by default); ValueError naming ``field``
    and the place for anything that is not an example object, and for a file without examples."""
    text = read_text(path, field)
    examples: list[tuple[str, object]] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {path} is not JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
        examples = [(f"example {i}", item) for i, item in enumerate(items, 1)]
    else:  # JSON Lines (in a .json file too: what Dataset.to_json writes by default)
        # "\n" only: JSON strings may hold U+2028 and the other breaks str.splitlines() also splits at
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                examples.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                if path.suffix.lower() == ".json" and _json_object(text):  # e.g. {"train": [...]}, pretty-printed
                    raise ValueError(
                        f"{field}: {path} holds one JSON object, not a list of examples nor one example per line"
                    ) from None
                raise ValueError(f"{field}: {path} line {number} is not JSON ({err.msg})") from None
    objects = []
    for where, example in examples:
        if not isinstance(example, dict):
            raise ValueError(f"{field}: {path} {where} is not a JSON object")
        objects.append((where, example))
    if not objects:
        raise ValueError(f"{field}: {path} holds no examples (it is empty, only whitespace or an empty list)")
    return objects


def _json_object(text: str) -> bool:
    """Whether ``text`` is one JSON object as a whole (a file that is no list of examples and no JSON Lines)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def tokenize_example(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, chat_loss: str = "last"
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example object (before its first token is untrained: :func:`_segments`): ``text``
    trains every token and ends with EOS; ``prompt`` and
    ``completion`` (tokenised separately, so the boundary is exact) train the completion and the EOS after it;
    ``messages`` are rendered with the tokenizer's chat template and train what the last (assistant) message adds
    to the rendering of the ones before it, or with ``chat_loss = "assistant"`` what every assistant message adds
    (its end-of-turn tokens included; the template supplies them, so no EOS is added). ValueError for any other
    shape."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    keys = set(example)

    def encode(text: object, name: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f'"{name}" must be a string, got {type(text).__name__}')
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    if keys == {"text"}:
        ids = encode(example["text"], "text") + eos
        return ids, list(ids)
    if keys == {"prompt", "completion"}:
        prompt, completion = encode(example["prompt"], "prompt"), encode(example["completion"], "completion") + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    if keys == {"messages"}:
        ids, labels = [], []
        for text, trained in _chat_pieces(example["messages"], tokenizer, chat_loss == "assistant"):
            piece = encode(text, "messages")
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels
    raise ValueError(
        f'an example holds "text", "prompt" and "completion", or "messages", got keys {sorted(keys)} (see '
        "fsdp4bit/train/README.md, Data)"
    )


def _chat_pieces(
    messages: object, tokenizer: PreTrainedTokenizerBase, every_assistant: bool = False
) -> list[tuple[str, bool]]:
    """The chat as rendered by the tokenizer's chat template, cut into (text, trained) pieces: the chat before its
    last message with the assistant's generation prompt (not trained), then what the last message adds (trained);
    with ``every_assistant``, so cut at every assistant message after the first message (what the chat before it
    renders with the generation prompt, then what the message adds), which needs each rendering to be the start of
    the next one (but for an EOS that a template writes after a finished chat only: it is trained at the end)."""
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f'message {i} of "messages" needs a string "role" and a string "content"')
    if messages[-1].get("role") != "assistant":
        raise ValueError(
            f'the last of "messages" must be the assistant\'s (trained on), got role {messages[-1].get("role")!r}'
        )
    if not tokenizer.chat_template:
        raise ValueError('"messages" need a chat template, and the tokenizer of model.path has none')

    def render(chat: list[dict], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        except Exception as err:  # the template's own checks raise jinja2's TemplateError (e.g. roles it refuses)
            raise ValueError(f"the tokenizer's chat template refuses it: {type(err).__name__}: {err}") from None

    ends = [i for i, m in enumerate(messages) if i > 0 and m["role"] == "assistant"] if every_assistant else []
    eos = tokenizer.eos_token or ""
    pieces, done, previous = [], "", 0
    for i in ends or [len(messages) - 1]:
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if eos and done.endswith(eos) and not prompt.startswith(done) and prompt.startswith(done[: -len(eos)]):
            # a template that ends a finished chat with EOS (Phi-3) has none after a turn the chat goes on from
            done = done[: -len(eos)]
            pieces[-1] = (pieces[-1][0][: -len(eos)], True)
        if not prompt.startswith(done):
            raise ValueError(
                f"the chat template renders message {previous} otherwise once the chat goes on (as templates that "
                "drop or add parts of earlier answers do), so each assistant message cannot be cut out of the chat; "
                'data.chat_loss = "last" trains the last message only'
            )
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template renders the chat before message {i} (with the generation prompt) as something "
                "other than the start of the chat up to it, so the assistant's part cannot be told apart"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done, previous = full, i
    return pieces


def pack(tokens: torch.Tensor, seq_len: int, field: str = "data.train_files") -> torch.Tensor:
    """``[n, 3, seq_len]`` sequences (ids, labels, positions) cut from the ``[3, L]`` stream of ``field``'s files
    (the remainder is dropped). A segment cut by a sequence's start goes on from position 0 there."""
    n = tokens.shape[-1] // seq_len
    if n == 0:
        raise ValueError(
            f"{field} hold {tokens.shape[-1]} tokens, too few for one sequence of data.seq_len={seq_len}: add text "
            "or lower data.seq_len"
        )
    sequences = tokens[:, : n * seq_len].reshape(3, n, seq_len).transpose(0, 1).contiguous()
    torch.minimum(sequences[:, 2], torch.arange(seq_len), out=sequences[:, 2])
    return sequences


def check_distinct(cfg: DataConfig) -> None:
    """ValueError for a file listed twice, in one list or in both: held-out text would be trained on (a train file
    in data.eval_files, or a repeated one whose second copy's end is the data.eval_fraction held out)."""
    seen: dict[Path, str] = {}
    for field in ("train_files", "eval_files"):
        for name in getattr(cfg, field):
            path = resolve_data_file(name).resolve()
            if path in seen:
                where = "twice" if seen[path] == field else f"in data.{seen[path]} too"
                raise ValueError(f"data.{field}: {name} is listed {where}; list each file once")
            seen[path] = field


def _held_out_split(train: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``eval_fraction`` of the sequences held out (at least one; none for 0, which
    config.validate allows only without held-out perplexity)."""
    n_eval = max(1, int(len(train) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    if n_eval >= len(train):
        raise ValueError(
            f"data.train_files give {len(train)} sequences of data.seq_len={cfg.seq_len}, and holding out "
            f"data.eval_fraction={cfg.eval_fraction} of them (at least one) leaves none to train on: add text, "
            "lower data.seq_len or set data.eval_files"
        )
    return train[: len(train) - n_eval], train[len(train) - n_eval :]


_BUILT: dict[tuple, tuple[torch.Tensor, torch.Tensor, bool]] = {}


def _build_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple:
    """What build_datasets' result depends on: the data settings, the tokenizer (its chat template too), each file's
    size and mtime."""
    stats = []
    for name in [*cfg.train_files, *cfg.eval_files]:
        path = resolve_data_file(name).resolve()
        st = path.stat()
        stats.append((str(path), st.st_size, st.st_mtime_ns))
    data = (tuple(cfg.train_files), tuple(cfg.eval_files), cfg.eval_fraction, cfg.seq_len, cfg.eval_max_sequences)
    data += (cfg.packing, cfg.chat_loss)
    return (*data, tokenizer.name_or_path, len(tokenizer), str(tokenizer.chat_template), tuple(stats))


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, chat_date: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train sequences, held-out sequences), each ``[n, 3, seq_len]`` int64 (ids, labels, positions), chat
    templates rendering ``chat_date`` (YYYY-MM-DD) as today (None: the clock's day). The last result is kept: the
    command line builds them to check the data before the model is built, and the run takes the same tensors."""
    key = (*_build_key(cfg, tokenizer), chat_date)
    if key not in _BUILT:
        _BUILT.clear()
        pin = DayPin(chat_date)
        with contextlib.nullcontext() if chat_date is None else templates_render_today_as(pin, tokenizer):
            _BUILT[key] = (*_build(cfg, tokenizer), pin.read)
    return _BUILT[key][:2]


def rendered_dates() -> bool:
    """Whether a chat template wrote today's date while the datasets kept last were built (only then does the day
    change what is trained)."""
    return any(dated for _, _, dated in _BUILT.values())


@dataclass
class DayPin:
    """The day (YYYY-MM-DD) chat templates render as today, and whether one did."""

    day: str | None
    read: bool = False


@contextlib.contextmanager
def templates_render_today_as(pin: DayPin, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Inside, chat templates' ``strftime_now`` gives ``pin.day`` at midnight, not the clock's time, and sets
    ``pin.read``.

    transformers gives templates that function and reads the clock through its module's ``datetime`` name (render
    arguments cannot replace it: they are reduced to plain data), so that name is swapped for the duration, for the
    whole process (another thread rendering a template meanwhile sees the same day). Where a transformers version
    reads the clock otherwise, ``tokenizer``'s template, if it reads the date, is warned about."""
    date = datetime.date.fromisoformat(pin.day)

    class PinnedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:
            pin.read = True
            return cls(date.year, date.month, date.day, tzinfo=tz)

    clock = getattr(chat_template_utils, "datetime", None)
    if not (isinstance(clock, type) and issubclass(clock, datetime.datetime)):  # (a subclass: pinned already)
        if "strftime_now" in str(tokenizer.chat_template or ""):
            pin.read = True
            warnings.warn(
                "fsdp4bit.train: this transformers version does not read the clock where fsdp4bit pins it, so the "
                "chat template renders today's date, not data.chat_date's day: a resume on another day may tokenise "
                "the chats differently",
                stacklevel=3,
            )
        yield
        return
    chat_template_utils.datetime = PinnedDatetime
    try:
        yield
    finally:
        chat_template_utils.datetime = clock


def _build(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """build_datasets without the kept result."""
    check_distinct(cfg)
    train = sequences_of(cfg.train_files, tokenizer, cfg.seq_len, cfg.packing, "data.train_files", cfg.chat_loss)
    if cfg.eval_files:
        held_out = sequences_of(cfg.eval_files, tokenizer, cfg.seq_len, cfg.packing, "data.eval_files", cfg.chat_loss)
    else:
        train, held_out = _held_out_split(train, cfg)
    if cfg.eval_max_sequences and len(held_out) > cfg.eval_max_sequences:
        # Evenly spaced over the held-out text, not just its beginning (a play opens with its cast list).
        held_out = held_out[torch.linspace(0, len(held_out) - 1, cfg.eval_max_sequences).long()]
    held_out_field = (
        "data.eval_files" if cfg.eval_files else f"data.eval_fraction={cfg.eval_fraction} of data.train_files"
    )
    for name, sequences in (("data.train_files", train), (held_out_field, held_out)):
        if len(sequences) and not trained_tokens(sequences):
            raise ValueError(
                f"{name} hold no trained token (an example's first token is never trained: each example is all "
                "prompt or a single token, or prompts are longer than data.seq_len): nothing to learn or score"
            )
    return train, held_out


def holds_boundaries(sequences: torch.Tensor) -> bool:
    """Whether a segment starts inside any of ``[n, 3, seq_len]`` sequences (a position 0 after the first token)."""
    return bool((sequences[:, 2, 1:] == 0).any())


def trained_tokens(sequences: torch.Tensor) -> int:
    """How many next tokens of ``[n, 3, seq_len]`` sequences the loss counts (labels not -100 after the first)."""
    return int((sequences[:, 1, 1:] != IGNORE).sum())


class RankBatches:
    """Deterministic micro-batches of one rank. ``position`` counts the micro-steps taken; ``stream`` (epoch, offset
    of the next micro-step in that epoch's order) is all that resuming needs."""

    def __init__(self, sequences: torch.Tensor, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if len(sequences) < micro_batch_size * world_size:
            raise ValueError(
                f"data.train_files give {len(sequences)} training sequences of data.seq_len={sequences.shape[-1]}, "
                f"fewer than one global micro-batch (train.micro_batch_size={micro_batch_size} x {world_size} ranks): "
                "add text or lower data.seq_len or train.micro_batch_size"
            )
        self.sequences = sequences
        self.micro = micro_batch_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.position = 0
        self.stream = (0, 0)
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.sequences), generator=gen)
            self._epoch = epoch
        return self._order

    def seek(self, position: int, stream: tuple[int, int]) -> None:
        """Continue from a checkpoint's micro-step count and stream position (of any world size)."""
        epoch, offset = stream
        if epoch < 0 or not 0 <= offset <= len(self.sequences):
            raise ValueError(f"data stream position {stream} lies outside {len(self.sequences)} training sequences")
        self.position, self.stream = position, (epoch, offset)

    def next(self) -> torch.Tensor:
        """This rank's batch of the next micro-step (``micro_batch_size`` sequences), then advance."""
        epoch, offset = self.stream
        step = self.micro * self.world
        if offset + step > len(self.sequences):
            epoch, offset = epoch + 1, 0
        start = offset + self.rank * self.micro
        batch = self.sequences[self._order_of(epoch)[start : start + self.micro]]
        self.position += 1
        self.stream = (epoch, offset + step)
        return batch


def stream_of(position: int, n_sequences: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """The stream position after ``position`` micro-steps on ``world_size`` ranks (checkpoints written before the
    stream position was saved kept only the micro-step count)."""
    step = micro_batch_size * world_size
    if n_sequences < step:
        raise ValueError(
            f"the checkpoint's run took {step} sequences per micro-step ({world_size} ranks x {micro_batch_size}), "
            f"and the training data now packs into {n_sequences}: a data file changed since"
        )
    epoch, slot = divmod(position, n_sequences // step)
    if slot == 0 and epoch > 0:  # the end of the epoch: the next micro-step starts the next one
        epoch, slot = epoch - 1, n_sequences // step
    return epoch, slot * step


def shard_for_rank(sequences: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every ``world_size``-th sequence starting at ``rank`` (held-out scoring splits the work this way)."""
    return sequences[rank::world_size]
