"""Text data: tokenise, pack into fixed-length sequences, and hand each rank its own micro-batches.

The order of training sequences is a pure function of the seed: epoch ``e`` is a permutation drawn from a
generator seeded with ``seed + e``, and each micro-step takes the next ``micro_batch_size * world`` sequences of
that stream, rank ``r`` the ``r``-th ``micro_batch_size`` of them (an epoch ends where a whole micro-step no longer
fits). Ranks never see the same sequence in a step, and resuming needs only the stream position (epoch, offset)
saved in checkpoints, on any world size: a run resumed on other ranks goes on where the old one stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_file(name: str) -> Path:
    """``name`` as given if it exists, else relative to the repository root (so configs work from any cwd)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    raise FileNotFoundError(f"data file not found: {name} (also looked in {REPO_ROOT})")


def tokenize_files(files: list[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All files as one flat int64 token stream; paragraphs are encoded separately, each file ends with EOS."""
    ids: list[int] = []
    for name in files:
        text = resolve_data_file(name).read_text(encoding="utf-8")
        paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
        for chunk in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
            ids.extend(chunk)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pack(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` sequences cut from the stream (the remainder is dropped)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are too few for one sequence of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """(train sequences, held-out sequences), each ``[n, seq_len]`` int64."""
    train = pack(tokenize_files(cfg.train_files, tokenizer), cfg.seq_len)
    if cfg.eval_files:
        held_out = pack(tokenize_files(cfg.eval_files, tokenizer), cfg.seq_len)
    else:
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        train, held_out = train[:-n_eval], train[-n_eval:]
    if cfg.eval_max_sequences and len(held_out) > cfg.eval_max_sequences:
        # Evenly spaced over the held-out text, not just its beginning (a play opens with its cast list).
        held_out = held_out[torch.linspace(0, len(held_out) - 1, cfg.eval_max_sequences).long()]
    return train, held_out


class RankBatches:
    """Deterministic micro-batches of one rank. ``position`` counts the micro-steps taken; ``stream`` (epoch, offset
    of the next micro-step in that epoch's order) is all that resuming needs."""

    def __init__(self, sequences: torch.Tensor, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if len(sequences) < micro_batch_size * world_size:
            raise ValueError(
                f"{len(sequences)} training sequences are fewer than one global micro-batch "
                f"({micro_batch_size} x {world_size} ranks)"
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
        """This rank's ``[micro_batch_size, seq_len]`` batch of the next micro-step, then advance."""
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
    epoch, slot = divmod(position, n_sequences // step)
    if slot == 0 and epoch > 0:  # the end of the epoch: the next micro-step starts the next one
        epoch, slot = epoch - 1, n_sequences // step
    return epoch, slot * step


def shard_for_rank(sequences: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every ``world_size``-th sequence starting at ``rank`` (held-out scoring splits the work this way)."""
    return sequences[rank::world_size]
