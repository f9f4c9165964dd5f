"""Held-out perplexity: exp(total negative log-likelihood / total trained tokens), over all ranks (a prompt's
tokens are not scored, as they are not trained)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .data import shard_for_rank, trained_tokens
from .loss import token_nll


@torch.no_grad()
def perplexity(
    model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    after_batch: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """(perplexity, mean loss) of ``model`` on ``sequences``; collective, every rank runs the same number of forwards.

    Under FSDP every forward all-gathers parameters, so a rank with fewer sequences still runs a forward on a
    placeholder batch whose loss it does not count. ``after_batch`` runs between forwards on every rank (the training
    loop's collective stop check, which may raise to abandon the evaluation; the model's mode is restored).
    """
    was_training = model.training
    model.eval()
    mine = shard_for_rank(sequences, rank, world_size)
    per_rank = math.ceil(len(sequences) / world_size)
    n_batches = math.ceil(per_rank / batch_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for i in range(n_batches):
            batch = mine[i * batch_size : (i + 1) * batch_size]
            counted = len(batch) > 0
            if not counted:
                batch = sequences[:1]
            nll = token_nll(model, batch.to(device))
            if counted:
                totals[0] += nll.double()
                totals[1] += trained_tokens(batch)
            if after_batch is not None and i < n_batches - 1:
                after_batch()
    finally:
        model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("sequences hold no trained token to score (every label is -100): perplexity is undefined")
    loss = (totals[0] / totals[1]).item()
    return math.exp(loss), loss
