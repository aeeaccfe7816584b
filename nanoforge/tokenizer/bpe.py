"""The tokenizer every stage uses: a byte-level BPE trained by rustbpe, run by tiktoken.

Notable:
- GPT-4's split pattern with numbers as \\p{N}{1,2} (nanochat's choice), nine
  special tokens taking the last ids. Special-token strings inside text are
  encoded as ordinary text, never as specials.
- Stored without pickle: the mergeable ranks in tiktoken's own `.tiktoken`
  format (base64 token, rank; `tiktoken.load.load_tiktoken_bpe` reads it too)
  and a small JSON (format, pattern, specials, vocab size, training params, the
  ranks file's sha256). Loading runs no code, and a tampered or truncated ranks
  file is refused with a clear error. Same ranks -> byte-identical files.
- `token_bytes` is the byte length of each token computed from its *bytes*
  (0 for specials). Decoding a token to str first would count a token that
  splits a multi-byte character as U+FFFD (3 bytes) and bias bits-per-byte.
  It is derived from the ranks at load (milliseconds for 65k tokens), not
  stored, so it can never disagree with them.
- Encoding calls tiktoken's Rust core directly. The lone-surrogate check is
  free: the core's UTF-8 conversion already fails on them, where tiktoken's
  public `encode_ordinary` would silently turn them into U+FFFD and break the
  round trip. Batches run on a thread pool kept per tokenizer (the Rust core
  releases the GIL), in a few contiguous chunks per thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nanoforge.common import TOKENIZER_DIR, atomic_path

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
FORMAT = "nanoforge-bpe/1"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, tampered with, or inconsistent; or an impossible vocab."""


def _surrogate_error(text: str, exc: UnicodeEncodeError, where: str = "text") -> ValueError:
    return ValueError(
        f"{where} contains a lone surrogate {text[exc.start]!r} at index {exc.start}; it is not valid "
        "Unicode text and cannot be encoded (it usually comes from decoding bytes with errors='surrogateescape' "
        "or from a JSON '\\ud83d' escape without its pair)"
    )


class Tokenizer:
    """tiktoken underneath; nanochat's small API on top."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, meta: dict | None = None):
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        offset = len(mergeable_ranks)
        self.special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanoforge", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._core = self.enc._core_bpe  # the Rust encoder: raises on lone surrogates instead of replacing them
        self.meta = meta or {}
        self.bos_id = self.special_tokens["<|bos|>"]
        self.vocab_size = self.enc.n_vocab
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in mergeable_ranks.items():
            lengths[rank] = len(token)  # bytes, not len(token.decode()): see the module docstring
        self.token_bytes = lengths  # specials stay 0: they are not text
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pools_pid = os.getpid()

    # spawned DataLoader workers get a copy by pickle: send the ranks, rebuild the Rust encoder and pool there
    def __getstate__(self) -> dict:
        return {"mergeable_ranks": self.mergeable_ranks, "pattern": self.pattern, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["mergeable_ranks"], state["pattern"], state["meta"])

    # --- encoding

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def _marker(self, token: int | str | None) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token

    def _encode_one(self, text: str, head: int | None, tail: int | None, where: str = "text") -> list[int]:
        try:
            ids = self._core.encode_ordinary(text)
        except UnicodeEncodeError as exc:
            raise _surrogate_error(text, exc, where) from None
        except TypeError:
            raise TypeError(f"{where}: expected str, got {type(text).__name__}") from None
        if head is not None:
            ids.insert(0, head)
        if tail is not None:
            ids.append(tail)
        return ids

    def _encode_chunk(self, texts: Sequence[str], start: int, head: int | None, tail: int | None) -> list[list[int]]:
        return [self._encode_one(t, head, tail, f"texts[{start + i}]") for i, t in enumerate(texts)]

    def _pool(self, num_threads: int) -> ThreadPoolExecutor:
        if os.getpid() != self._pools_pid:  # a forked child (DataLoader worker) inherits no live threads
            self._pools, self._pools_pid = {}, os.getpid()
        pool = self._pools.get(num_threads)
        if pool is None:
            pool = self._pools[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="bpe")
        return pool

    def encode(
        self,
        text: str | Sequence[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode one text (-> ids) or a list of texts (-> list of ids, on up to `num_threads` threads,
        never more than this process's CPUs).

        `prepend`/`append` add a token id or a special token's name, e.g. prepend="<|bos|>".
        Raises ValueError for text holding a lone surrogate (it could never round-trip).
        """
        head, tail = self._marker(prepend), self._marker(append)
        if isinstance(text, str):
            return self._encode_one(text, head, tail)
        if isinstance(text, (bytes, bytearray)) or not hasattr(text, "__iter__"):
            raise TypeError(f"expected str or a list of str, got {type(text).__name__}")
        texts = text if isinstance(text, list) else list(text)
        num_threads = min(num_threads, _CPUS)  # more threads than cores only adds GIL hand-offs
        if num_threads <= 1 or len(texts) <= 1:
            return self._encode_chunk(texts, 0, head, tail)
        # a few chunks per thread: fewer futures than one per text, yet long documents still spread out
        n_chunks = min(len(texts), 4 * num_threads)
        bounds = [len(texts) * i // n_chunks for i in range(n_chunks + 1)]
        pool = self._pool(num_threads)
        futures = [
            pool.submit(self._encode_chunk, texts[a:b], a, head, tail) for a, b in zip(bounds, bounds[1:])
        ]
        out: list[list[int]] = []
        for future in futures:
            out.extend(future.result())
        return out

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text. Ids that end mid-character decode to U+FFFD (see decode_bytes)."""
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def id_to_token(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    # --- storage

    def save(self, directory: str | Path = TOKENIZER_DIR, train_info: dict | None = None) -> None:
        """Write the ranks file, then the JSON meta that pins its sha256, each atomically.

        A kill between the two leaves a ranks file whose hash the old meta does not
        match, which `load_tokenizer` refuses: a half-written tokenizer never loads.
        """
        directory = Path(directory)
        ranks_text = b"".join(
            base64.b64encode(token) + b" %d\n" % rank
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        )
        with atomic_path(directory / RANKS_FILE) as tmp:
            tmp.write_bytes(ranks_text)
        meta = {
            "format": FORMAT,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "num_merges": len(self.mergeable_ranks) - 256,
            "ranks_sha256": hashlib.sha256(ranks_text).hexdigest(),
            "train": train_info if train_info is not None else self.meta.get("train", {}),
        }
        with atomic_path(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.meta = meta


def load_tokenizer(directory: str | Path = TOKENIZER_DIR) -> Tokenizer:
    """Load a tokenizer directory written by `Tokenizer.save` (no code execution involved)."""
    directory = Path(directory)
    ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
    for path in (ranks_path, meta_path):
        if not path.exists():
            raise TokenizerError(f"{path}: missing; train the tokenizer first (python -m stages.tokenizer)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TokenizerError(f"{meta_path}: format {found!r}, expected {FORMAT!r}; re-train it (dvc repro tokenizer)")
    data = ranks_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("ranks_sha256"):
        raise TokenizerError(
            f"{ranks_path}: its sha256 does not match {meta_path.name}; the file was truncated or changed. "
            "Re-train it (dvc repro tokenizer) or restore it (dvc checkout)"
        )
    # the hash matched, so what follows only catches a meta file edited together with its ranks
    ranks: dict[bytes, int] = {}
    lines = data.splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{ranks_path}:{lineno}: malformed line {line[:60]!r}") from None
    if len(ranks) != len(lines) or sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{ranks_path}: tokens repeat or ranks are not the contiguous ids 0..{len(lines) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{ranks_path}: not byte-level: {len(missing)} single bytes have no token (first: {missing[0]})")
    if len(ranks) + len(SPECIAL_TOKENS) != meta.get("vocab_size"):
        raise TokenizerError(
            f"{directory}: {len(ranks)} ranks + {len(SPECIAL_TOKENS)} specials != vocab_size {meta.get('vocab_size')}"
        )
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if meta.get("special_tokens") != expected:
        raise TokenizerError(f"{meta_path}: special tokens {meta.get('special_tokens')} differ from this code's {expected}")
    try:
        return Tokenizer(ranks, meta.get("pattern", SPLIT_PATTERN), meta)
    except ValueError as exc:  # e.g. a split pattern the regex engine rejects
        raise TokenizerError(f"{directory}: tiktoken rejects it: {exc}") from None


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: it must hold 256 byte tokens + {len(SPECIAL_TOKENS)} specials "
            f"(at least {MIN_VOCAB_SIZE})"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
    """Train with rustbpe: `vocab_size` counts the 256 bytes, the merges and the specials.

    rustbpe pulls `texts` in buffers of 8192 under the GIL and splits/counts them in
    parallel without it, so a streaming iterator keeps memory bounded. When the
    text runs out of pairs to merge, the vocabulary comes out smaller than asked.
    """
    import rustbpe

    check_vocab_size(vocab_size)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return Tokenizer(ranks, pattern)
