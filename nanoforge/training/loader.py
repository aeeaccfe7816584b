"""The training data loader: shards -> documents -> one token stream -> (B, T+1) rows.

Notable:
- One global stream, the same on every rank: the row groups of the training
  shards in manifest order (later epochs in a seeded permutation), BOS before
  every document, cut into rows of T+1 tokens that overlap by one token (every
  token transition is trained once). Step s trains rows [s*R, (s+1)*R) with
  R = total_batch / T; micro-batch j of it is rows [j*B, (j+1)*B), and rank r
  takes micro-batches r*accum .. r*accum + accum - 1. So the tokens of a step
  depend only on the data, the seed, T and the total batch, never on the world
  size or the device batch: one process with 2 micro-steps sees exactly what
  2 ranks with 1 micro-step see, and a checkpoint resumes at any world size.
- The price: every rank tokenizes the whole stream (cheap next to a GPU step;
  tiktoken runs in threads without the GIL), in exchange for a position that is
  one small dict, identical on every rank.
- A background thread reads and tokenizes ahead (`prefetch` steps), so the
  training loop never waits on parquet or the tokenizer. Its tokenizer threads
  default to `nanoforge.cpus.loader_threads` (1 on CPU, where the compute threads
  own the cores; up to 4 beside a GPU), never more than the CPUs this process may use.
- The position (epoch, row group, document, token offset) at the start of each
  step travels with its batches; a checkpoint stores it and resume re-reads just
  that one row group.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from nanoforge.config import TrainConfig
from nanoforge.cpus import loader_threads, usable_cpus

TOKENIZE_CHUNK = 128  # documents per tokenizer call


def start_state() -> dict:
    return {"epoch": 0, "index": 0, "doc": 0, "offset": 0}


class TokenStream:
    """The global token stream, as rows of T+1 tokens, with an exact resumable position."""

    def __init__(self, paths: Sequence[Path], tokenizer, seq_len: int, seed: int = 0,
                 state: dict | None = None, threads: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        # more tokenizer threads than usable CPUs only preempt the compute threads (a cgroup quota included)
        self.threads = max(1, min(loader_threads("cpu") if threads is None else threads, usable_cpus()))
        self.groups = [(s, g) for s, p in enumerate(self.paths) for g in range(pq.ParquetFile(p).num_row_groups)]
        if not self.groups:
            raise ValueError(f"the training shards hold no row groups: {', '.join(map(str, self.paths))}")
        state = dict(state or start_state())
        for key in ("epoch", "index", "doc", "offset"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"bad loader position {state!r}: '{key}' must be a non-negative int")
        if state["index"] >= len(self.groups):
            raise ValueError(
                f"loader position {state!r} points past the {len(self.groups)} row groups of the training data; "
                "the data changed since the checkpoint was written"
            )
        self._epoch, self._index = state["epoch"], state["index"]
        self._order = self._epoch_order(self._epoch)
        # documents tokenized and not yet fully consumed: [epoch, index, doc, tokens, offset]
        self._docs: deque = deque()
        self._texts: list[str] = []
        self._next_doc = state["doc"]
        self._skip = state["offset"]  # tokens of the first document already trained on
        self._file: tuple[int, pq.ParquetFile] | None = None
        self._buffered = 0
        self._empty_epochs = 0
        self._load_group()

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.groups)))
        if epoch > 0:  # the shards are pre-shuffled; later epochs see row groups in a new order
            random.Random(f"nanoforge/{self.seed}/{epoch}").shuffle(order)
        return order

    def _load_group(self) -> None:
        shard, group = self.groups[self._order[self._index]]
        if self._file is None or self._file[0] != shard:
            self._file = (shard, pq.ParquetFile(self.paths[shard]))
        column = self._file[1].read_row_group(group, columns=["text"]).column("text").to_pylist()
        self._texts = [t for t in column if t]
        if self._texts:
            self._empty_epochs = 0

    def _advance_group(self) -> None:
        self._index += 1
        self._next_doc = 0
        if self._index == len(self.groups):
            self._index = 0
            self._epoch += 1
            self._order = self._epoch_order(self._epoch)
            self._empty_epochs += 1
            if self._empty_epochs > 1:
                raise ValueError("the training shards hold no text: a whole epoch produced no documents")
        self._load_group()

    def _fill(self, needed: int) -> None:
        while self._buffered < needed:
            if self._next_doc >= len(self._texts):
                self._advance_group()
                continue
            first = self._next_doc
            chunk = self._texts[first:first + TOKENIZE_CHUNK]
            encoded = self.tokenizer.encode(chunk, prepend=self.tokenizer.bos_id, num_threads=self.threads)
            for i, ids in enumerate(encoded):
                tokens = np.asarray(ids, dtype=np.int32)
                offset = 0
                if self._skip:  # resuming inside this document
                    offset, self._skip = self._skip, 0
                    if offset > len(tokens):
                        raise ValueError("the loader position does not match the data: a document is shorter than its offset")
                self._docs.append([self._epoch, self._index, first + i, tokens, offset])
                self._buffered += len(tokens) - offset
            self._next_doc = first + len(chunk)

    def state(self) -> dict:
        """Position of the next row's first token."""
        if self._docs:
            epoch, index, doc, _, offset = self._docs[0]
            return {"epoch": epoch, "index": index, "doc": doc, "offset": offset}
        return {"epoch": self._epoch, "index": self._index, "doc": self._next_doc, "offset": self._skip}

    def next_row(self, out: np.ndarray | None) -> None:
        """Write the next T+1 tokens into `out` (or just skip them when None); advance by T."""
        T = self.seq_len
        self._fill(T + 1)
        filled = 0
        consumed = 0
        for entry in self._docs:
            tokens, offset = entry[3], entry[4]
            take = min(len(tokens) - offset, T + 1 - filled)
            if out is not None:
                out[filled:filled + take] = tokens[offset:offset + take]
            filled += take
            if filled == T + 1:
                break
        # advance by T: the last token of this row is the first of the next
        while consumed < T:
            entry = self._docs[0]
            step = min(len(entry[3]) - entry[4], T - consumed)
            entry[4] += step
            consumed += step
            if entry[4] == len(entry[3]):
                self._docs.popleft()
        self._buffered -= T


def batch_geometry(total_batch: int, device_batch: int, seq_len: int, world_size: int) -> int:
    """Gradient accumulation steps; a ValueError naming the numbers and the nearest valid ones otherwise."""
    return TrainConfig.batch_geometry(total_batch, device_batch, seq_len, world_size)


class TrainLoader:
    """This rank's micro-batches, step after step: yields (x, y, step_state).

    `step_state` is the stream position at the start of the step the micro-batch
    belongs to; saving it after a step resumes exactly at the next one.
    """

    def __init__(self, paths: Sequence[Path], tokenizer, seq_len: int, device_batch: int, total_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, state: dict | None = None,
                 device: torch.device | str = "cpu", threads: int | None = None, prefetch: int = 2):
        self.seq_len, self.device_batch = seq_len, device_batch
        self.accum = batch_geometry(total_batch, device_batch, seq_len, world_size)
        self.rows_per_step = total_batch // seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if threads is None:
            threads = loader_threads(self.device.type)
        self.stream = TokenStream(paths, tokenizer, seq_len, seed=seed, state=state, threads=threads)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch) * self.accum)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="train-loader", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        B, T = self.device_batch, self.seq_len
        first_row = self.rank * self.accum * B
        last_row = first_row + self.accum * B
        pin = self.device.type == "cuda"
        try:
            while not self._stop.is_set():
                state = self.stream.state()
                mine = np.empty((self.accum * B, T + 1), dtype=np.int32)
                for row in range(self.rows_per_step):
                    inside = first_row <= row < last_row
                    self.stream.next_row(mine[row - first_row] if inside else None)
                for m in range(self.accum):
                    block = torch.from_numpy(mine[m * B:(m + 1) * B])
                    x = block[:, :-1].contiguous()
                    y = block[:, 1:].to(torch.int64)
                    if pin:
                        x, y = x.pin_memory(), y.pin_memory()
                    if not self._put((x, y, state)):
                        return
        except BaseException as exc:  # hand the error to the training loop
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        x, y, state = item
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking), state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
