"""Text data: tokenise, pack into fixed-length sequences, and hand each rank its own micro-batches.

The order of training sequences is a pure function of (seed, micro-step): epoch ``e`` is a permutation
drawn from a generator seeded with ``seed + e``, and micro-step ``k`` of rank ``r`` takes the
``micro_batch_size`` sequences at positions ``(k * world + r) * micro_batch_size`` of that stream. Ranks
never see the same sequence in a step, and resuming needs only the micro-step counter (the "data position"
saved in checkpoints).
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
    """Deterministic micro-batches of one rank; ``position`` (micro-steps taken) is all that resuming needs."""

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
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.sequences), generator=gen)
            self._epoch = epoch
        return self._order

    def batch_at(self, position: int) -> torch.Tensor:
        """The ``[micro_batch_size, seq_len]`` batch of this rank at micro-step ``position``."""
        per_epoch = len(self.sequences) // (self.micro * self.world)
        epoch, slot = divmod(position, per_epoch)
        start = (slot * self.world + self.rank) * self.micro
        return self.sequences[self._order_of(epoch)[start : start + self.micro]]

    def next(self) -> torch.Tensor:
        """The batch at the current position, then advance."""
        batch = self.batch_at(self.position)
        self.position += 1
        return batch


def shard_for_rank(sequences: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every ``world_size``-th sequence starting at ``rank`` (held-out scoring splits the work this way)."""
    return sequences[rank::world_size]
