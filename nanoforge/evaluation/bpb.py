"""Bits per byte: the loss that stays comparable when the tokenizer changes.

Notable:
- nanochat's definition, exactly: per-token cross-entropy in nats (fp32 logits
  after the softcap, from the model) summed over targets whose `token_bytes` > 0,
  divided by the bytes of those targets and by ln 2. Special tokens (BOS) count
  neither nats nor bytes; targets of -1 are ignored.
- The evaluation set is fixed: documents from the start of a shard, BOS before
  each, one stream cut into rows of T+1 tokens that overlap by one token, so every
  token after the first is a target exactly once. Same budget, same tokens, every
  time, at every world size.
- Row i belongs to rank i % world; the sums are all-reduced, so 1 and N processes
  get the same number. Accumulation is float64 (float32 on MPS, which has none).
- Rows are built once (`load_rows`) and reused: training evaluates every few
  hundred steps without re-tokenizing.
- Memory: under no_grad the GPT computes head, softcap and cross-entropy in chunks
  of positions (`nanoforge.model.gpt.LOSS_CHUNK_BYTES`), so a batch of 32 x 2048 at
  vocab 65,536 never holds its 17 GB of fp32 logits at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from nanoforge.data.shards import iter_documents


def load_rows(texts: Iterable[str], tokenizer, seq_len: int, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` targets of `texts` (BOS before each) as rows of seq_len + 1 ids (int32, CPU).

    Rows = max(1, num_tokens // seq_len). A source shorter than the budget gives the rows it
    can fill (check `rows.size(0)`); less than one row is an error.
    """
    num_rows = max(1, num_tokens // seq_len)
    needed = num_rows * seq_len + 1
    stream: list[int] = []
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == 64:
            for ids in tokenizer.encode(chunk, prepend=tokenizer.bos_id):
                stream.extend(ids)
            chunk = []
            if len(stream) >= needed:
                break
    if chunk and len(stream) < needed:
        for ids in tokenizer.encode(chunk, prepend=tokenizer.bos_id):
            stream.extend(ids)
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"the BPB source holds only {len(stream)} tokens, fewer than one row of {seq_len + 1}; "
            "use a larger shard or a shorter sequence length"
        )
    num_rows = min(num_rows, (len(stream) - 1) // seq_len)
    data = torch.tensor(stream[: num_rows * seq_len + 1], dtype=torch.int32)
    # row i = stream[i*T : i*T + T + 1]: consecutive rows share one token
    return data.unfold(0, seq_len + 1, seq_len).contiguous()


def shard_rows(paths: Sequence[Path], tokenizer, seq_len: int, num_tokens: int) -> torch.Tensor:
    """`load_rows` over parquet shards read from their start, in order (e.g. the val shard)."""
    return load_rows(iter_documents([Path(p) for p in paths]), tokenizer, seq_len, num_tokens)


def rank_batches(rows: torch.Tensor, batch_size: int, runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows (i % world == rank) as (x, y) batches of up to `batch_size` rows on its device."""
    mine = rows[runtime.rank :: runtime.world_size]
    for i in range(0, mine.size(0), batch_size):
        block = mine[i : i + batch_size].to(runtime.device, dtype=torch.long, non_blocking=True)
        yield block[:, :-1].contiguous(), block[:, 1:].contiguous()


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes, runtime) -> float:
    """Bits per byte of `model` over `batches`, summed over all ranks.

    - `model(x, y, loss_reduction="none")` must return (B, T) per-token losses in nats.
      Pass the plain model, not a DDP wrapper: ranks may run different numbers of batches,
      and a wrapper that syncs buffers in forward would hang.
    - `batches`: iterable of (x, y) LongTensors (B, T) on `runtime.device`, e.g. `rank_batches(...)`.
      Targets < 0 are ignored.
    - `token_bytes`: byte length per token id (numpy array or tensor), 0 for specials.
    - Every rank must call this (the sums are all-reduced).
    """
    device = runtime.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    nbytes = torch.as_tensor(np.asarray(token_bytes) if not torch.is_tensor(token_bytes) else token_bytes)
    nbytes = nbytes.to(device=device, dtype=torch.long)
    totals = torch.zeros(2, dtype=acc_dtype, device=device)  # nats, bytes
    for x, y in batches:
        with runtime.autocast():
            loss = model(x, y, loss_reduction="none")
        loss = loss.float().reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        counted = torch.where(valid, nbytes[torch.where(valid, y, torch.zeros_like(y))], torch.zeros_like(y))
        mask = counted > 0
        # torch.where, not a multiply: an ignored target may carry a nan/inf loss
        totals[0] += torch.where(mask, loss, torch.zeros_like(loss)).sum().to(acc_dtype)
        totals[1] += counted.sum().to(acc_dtype)
    runtime.all_reduce_sum(totals)
    nats, total_bytes = totals.tolist()
    if total_bytes <= 0:
        raise ValueError("BPB over zero bytes: the batches hold no targets with token_bytes > 0")
    return nats / (math.log(2) * total_bytes)
