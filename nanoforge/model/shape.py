"""The model's shape from its one dial, depth: `GPTConfig` and `config_for_depth`.

Notable:
- nanochat's rule, written once: width 64*depth, heads ceil(width/128) (head_dim 128
  for even depths), layers = depth. `GPTConfig` checks that the shape is buildable.
- The architecture options of nanochat's 2026 recipe (value embeddings, sliding-window
  pattern, x0/residual lambdas, smear, backout, init, RoPE base, QK scale) are fields
  too; their defaults are the FineWeb-era (2025) model, so an old config.json builds the
  same model. `train.recipe` picks them (nanoforge/config.py).
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
    # nanochat HEAD (2026) options; these defaults are the FineWeb-era model, bit for bit
    value_embeds: bool = False  # ResFormer value embeddings on alternating layers (the last always)
    window_pattern: str = "L"  # per layer, tiled: L = full context, S = a quarter (ceil to 128); last layer L
    lambdas: bool = False  # learned resid_lambdas (scale x) and x0_lambdas (add the embedding back) per layer
    smear: bool = False  # mix the previous token's embedding into each position (a learned gate)
    backout: bool = False  # subtract a learned share of the mid-depth residual before the final norm
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap)
    init: str = "2025"  # 2025: normal std 1/sqrt(fan_in)... ; 2026: nanochat HEAD's uniform init
    rope_base: float = 10_000.0
    qk_scale: float = 1.0  # q and k are each multiplied by this after QK norm (HEAD: 1.2)

    def __post_init__(self):
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern={self.window_pattern!r}: use only S (short) and L (long), e.g. SSSL")
        if self.init not in ("2025", "2026"):
            raise ValueError(f"init={self.init!r}: expected '2025' or '2026'")
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

    def window_sizes(self) -> list[int]:
        """Per layer, how many earlier tokens a position sees (nanochat HEAD's rule: a short window is
        a quarter of the context rounded up to FA3's tile of 128; the last layer always sees all)."""
        long_window = self.sequence_len
        short_window = -(-long_window // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(self.n_layer)]
        sizes[-1] = long_window
        return sizes

    def to_dict(self) -> dict:
        return asdict(self)


def width_and_heads(depth: int) -> tuple[int, int]:
    """nanochat's derivation: width 64*depth, heads ceil(width/128)."""
    width = 64 * depth
    return width, max(1, -(-width // 128))


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, n_kv_head: int | None = None,
                     **options) -> GPTConfig:
    """The GPT of a given depth (a ValueError when that depth's width does not split into its heads);
    `options` are the architecture options (GPTConfig's recipe fields)."""
    width, n_head = width_and_heads(depth)
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=width,
        **options,
    )
