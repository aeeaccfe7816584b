"""The model's shape from its one dial, depth: `GPTConfig` and `config_for_depth`.

Notable:
- nanochat's rule, written once: width 64*depth, heads ceil(width/128) (head_dim 128
  for even depths), layers = depth. `GPTConfig` checks that the shape is buildable.
- No torch here, so params validation (`nanoforge.config`, imported by every stage
  and by Dagster) applies the same rule without loading torch; `gpt.py` re-exports both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VOCAB_MULTIPLE = 64  # the embedding and LM head are padded to a multiple of this (faster matmuls)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict:
        return asdict(self)


def width_and_heads(depth: int) -> tuple[int, int]:
    """nanochat's derivation: width 64*depth, heads ceil(width/128)."""
    width = 64 * depth
    return width, max(1, -(-width // 128))


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, n_kv_head: int | None = None) -> GPTConfig:
    """The GPT of a given depth (a ValueError when that depth's width does not split into its heads)."""
    width, n_head = width_and_heads(depth)
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=width,
    )
