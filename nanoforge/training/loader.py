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
- `train.loader: bestfit` is nanochat's 2026 BOS-aligned best-fit packing
  (BestFitStream): every row starts at a document's BOS, whole documents are
  packed largest-that-fits first from a buffer, and when none fits the shortest is
  cropped to fill the row (no padding; the cropped rest is dropped). The same global
  stream, so world-size invariance holds; its position adds the buffer's documents
  (references, re-read and re-tokenized on resume), so resume stays exact.
"""

from __future__ import annotations

import bisect
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
LOADERS = ("stream", "bestfit")


def start_state(kind: str = "stream") -> dict:
    state = {"epoch": 0, "index": 0, "doc": 0, "offset": 0}
    return {**state, "buffer": []} if kind == "bestfit" else state


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
        if "buffer" in state and type(self) is TokenStream:  # the config check names the key first; this is the net
            raise ValueError("the loader position is a best-fit one (train.loader: bestfit) but train.loader is stream")
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

    def _group_texts(self, order: list[int], index: int) -> list[str]:
        """The non-empty documents of row group `index` in an epoch's order: what a doc number counts."""
        shard, group = self.groups[order[index]]
        if self._file is None or self._file[0] != shard:
            self._file = (shard, pq.ParquetFile(self.paths[shard]))
        column = self._file[1].read_row_group(group, columns=["text"]).column("text").to_pylist()
        return [t for t in column if t]

    def _load_group(self) -> None:
        self._texts = self._group_texts(self._order, self._index)
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


class BestFitStream(TokenStream):
    """nanochat's BOS-aligned best-fit rows (dataloader.py at HEAD) over the same global document stream.

    For each row of T+1 tokens: take the largest buffered document that fits whole (the
    earliest of equals), again until none fits, then crop the shortest (the earliest of
    equals) to fill the row exactly. The buffer holds exactly `buffer_docs` documents at
    each choice (nanochat's fluctuates by its 128-document refills), so the rows depend
    only on the data, T and the seed. Lengths stay sorted (bisect), not scanned per choice.
    """

    def __init__(self, paths: Sequence[Path], tokenizer, seq_len: int, seed: int = 0,
                 state: dict | None = None, threads: int | None = None, buffer_docs: int = 1000):
        state = dict(state or start_state("bestfit"))
        refs = state.pop("buffer", None)
        if not isinstance(refs, list) or not all(
                isinstance(r, list) and len(r) == 3 and all(isinstance(v, int) and v >= 0 for v in r) for r in refs):
            raise ValueError("the loader position is not a best-fit one (train.loader: bestfit): it has no buffer of "
                             "[epoch, index, doc] references; was it written with train.loader: stream?")
        if state.get("offset") != 0:
            raise ValueError(f"bad best-fit loader position {state!r}: 'offset' must be 0 (rows start at a BOS)")
        super().__init__(paths, tokenizer, seq_len, seed, state, threads)
        self.buffer_docs = buffer_docs
        self._pending: deque = deque()  # read ahead, not yet in the buffer: (ref, tokens)
        self._keys: list[tuple[int, int]] = []  # (length, arrival), sorted; _entries aligned with it
        self._entries: list[tuple[list, np.ndarray]] = []
        self._arrival = 0
        for ref, tokens in self._restore(refs):
            self._add(ref, tokens)

    def _restore(self, refs: list[list]) -> list:
        """Re-read and re-tokenize the buffered documents of a saved position, in their order."""
        texts = {}
        for epoch, index, doc in refs:
            if (epoch, index) not in texts:
                if index >= len(self.groups):
                    raise ValueError(f"best-fit loader buffer entry {[epoch, index, doc]} points past the "
                                     f"{len(self.groups)} row groups: the data changed since the checkpoint")
                texts[epoch, index] = self._group_texts(self._epoch_order(epoch), index)
        wanted = []
        for epoch, index, doc in refs:
            group = texts[epoch, index]
            if doc >= len(group):
                raise ValueError(f"best-fit loader buffer entry {[epoch, index, doc]}: that row group has "
                                 f"{len(group)} documents: the data changed since the checkpoint")
            wanted.append(group[doc])
        encoded = self.tokenizer.encode(wanted, prepend=self.tokenizer.bos_id, num_threads=self.threads) if wanted else []
        return [(list(ref), np.asarray(ids, dtype=np.int32)) for ref, ids in zip(refs, encoded)]

    def _add(self, ref: list, tokens: np.ndarray) -> None:
        key = (len(tokens), self._arrival)
        self._arrival += 1
        at = bisect.bisect_left(self._keys, key)
        self._keys.insert(at, key)
        self._entries.insert(at, (ref, tokens))

    def _take(self, at: int) -> np.ndarray:
        del self._keys[at]
        return self._entries.pop(at)[1]

    def _read_ahead(self) -> None:
        while self._next_doc >= len(self._texts):
            self._advance_group()
        first = self._next_doc
        chunk = self._texts[first:first + TOKENIZE_CHUNK]
        encoded = self.tokenizer.encode(chunk, prepend=self.tokenizer.bos_id, num_threads=self.threads)
        for i, ids in enumerate(encoded):
            self._pending.append(([self._epoch, self._index, first + i], np.asarray(ids, dtype=np.int32)))
        self._next_doc = first + len(chunk)

    def _top_up(self) -> None:
        while len(self._keys) < self.buffer_docs:
            if not self._pending:
                self._read_ahead()
            self._add(*self._pending.popleft())

    def state(self) -> dict:
        """The next document not in the buffer, and the buffer's documents in arrival order."""
        if self._pending:
            epoch, index, doc = self._pending[0][0]
        else:
            epoch, index, doc = self._epoch, self._index, self._next_doc
        order = sorted(range(len(self._keys)), key=lambda i: self._keys[i][1])
        return {"epoch": epoch, "index": index, "doc": doc, "offset": 0,
                "buffer": [list(self._entries[i][0]) for i in order]}

    def next_row(self, out: np.ndarray | None) -> None:
        """Pack the next row of T+1 tokens into `out` (or only make the same choices when None)."""
        capacity = self.seq_len + 1
        pos = 0
        while pos < capacity:
            self._top_up()
            remaining = capacity - pos
            fits = bisect.bisect_right(self._keys, (remaining, self._arrival))
            if fits:  # the largest length that fits, its earliest document
                tokens = self._take(bisect.bisect_left(self._keys, (self._keys[fits - 1][0], -1)))
            else:  # nothing fits: crop the shortest
                tokens = self._take(0)[:remaining]
            if out is not None:
                out[pos:pos + len(tokens)] = tokens
            pos += len(tokens)


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
                 device: torch.device | str = "cpu", threads: int | None = None, prefetch: int = 2,
                 kind: str = "stream", buffer_docs: int = 1000):
        self.seq_len, self.device_batch = seq_len, device_batch
        self.accum = batch_geometry(total_batch, device_batch, seq_len, world_size)
        self.rows_per_step = total_batch // seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if threads is None:
            threads = loader_threads(self.device.type)
        if kind == "bestfit":
            self.stream = BestFitStream(paths, tokenizer, seq_len, seed=seed, state=state, threads=threads,
                                        buffer_docs=buffer_docs)
        elif kind == "stream":
            self.stream = TokenStream(paths, tokenizer, seq_len, seed=seed, state=state, threads=threads)
        else:
            raise ValueError(f"train.loader={kind!r}: expected one of {', '.join(LOADERS)}")
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
