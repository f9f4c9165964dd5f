"""The language-modelling loss on packed sequences of (ids, labels, positions): summed over trained tokens, so a
step can weigh every trained token alike however they fall across micro-batches and ranks (prompt tokens are not
trained)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import IGNORE


def token_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The summed negative log-likelihood (float32) of ``batch``'s trained next tokens under ``model``: ``batch`` is
    ``[b, 3, seq_len]`` (ids, labels, positions), the logits at position ``i`` predict label ``i + 1``; divide by
    :func:`~fsdp4bit.train.data.trained_tokens` for the mean. Position ids that restart mark packed segments, which
    Hugging Face models keep from attending to each other when there is no KV cache (hence ``use_cache=False``) and
    no 2D attention mask."""
    ids, labels, positions = batch.unbind(1)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    # the labels shift, not the logits: a slice of the logits would be copied again to flatten it
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def global_count(count: int, device: torch.device) -> int:
    """``count`` summed over all ranks (collective; the count itself where there is no process group)."""
    if not dist.is_initialized():
        return count
    total = torch.tensor(count, dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total)
