"""nanochat's GPT (FineWeb era), one dial: depth.

Notable:
- Rotary embeddings (base 10,000), no learned positions; QK norm after RoPE.
- Grouped-query attention: `n_kv_head` key/value heads shared by the query heads;
  attention is `scaled_dot_product_attention` (causal).
- Parameter-free RMSNorm after the embedding, before each sublayer, before the head.
- MLP 4x with ReLU^2; no biases anywhere; embedding and LM head untied.
- Logits are softcapped as 15*tanh(x/15) in float32. The vocabulary is padded to
  a multiple of 64 (faster matmuls); the padding is cropped from the logits, so
  callers never see it.
- The loss runs head, softcap and cross-entropy in chunks of positions
  (`LOSS_CHUNK_BYTES` of fp32 logits each) without gradients (BPB, evaluation) and
  when training on CUDA (chunks under activation checkpointing, run eager: a graph
  break under torch.compile), so the fp32 logits are never several copies of
  B x T x vocab; CPU training keeps the plain path, bit for bit.
- Init as nanochat: linear std 1/sqrt(fan_in)*min(1, sqrt(fan_out/fan_in)),
  embedding N(0, 1), LM head and both output projections zero.
- `estimate_flops()` is nanochat's: 6*(params - embedding) + 12*L*heads*head_dim*T.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanoforge.model.shape import VOCAB_MULTIPLE, GPTConfig, config_for_depth  # noqa: F401 (the shape rule lives there)

SOFTCAP = 15.0
ROPE_BASE = 10_000
# fp32 logits per chunk of the loss; the softcap, log-softmax (and in training, gradient)
# transients are a few times this, independent of the batch
LOSS_CHUNK_BYTES = 1 << 30


def norm(x: torch.Tensor) -> torch.Tensor:
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); rotate the two halves of the head dimension
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        # 10x the training length, so sampling can run past it (as nanochat)
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.head_dim
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROPE_BASE ** (channels / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init; also (re)computes the rotary buffers (needed after a meta-device build)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.reset_rotary()

    @torch.no_grad()
    def reset_rotary(self) -> None:
        cos, sin = self._rotary(self.rotary_seq_len, device=self.lm_head.weight.device)
        self.cos, self.sin = cos, sin

    # --- accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_embedding_params(self) -> int:
        return self.transformer.wte.weight.numel()

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6*(params - embedding) + 12*L*heads*head_dim*T (attention)."""
        c = self.config
        dense = 6 * (self.num_params() - self.num_embedding_params())
        return dense + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer split: matrices in the blocks (Muon), embedding and LM head (AdamW)."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "lm_head": list(self.lm_head.parameters()),
        }

    # --- forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                loss_chunk_rows: int | None = None):
        """Logits (B, T, V) in fp32, or the cross-entropy against `targets` (-1 ignored).

        The loss runs head, softcap and cross-entropy `loss_chunk_rows` positions at a time
        (default: LOSS_CHUNK_BYTES of fp32 logits), so the fp32 logits never exist for the
        whole batch (17 GB a copy at seq 2048, batch 32, vocab 65,536):
        - without gradients (evaluation): always;
        - with gradients on CUDA, when the batch holds more than one chunk: each chunk under
          activation checkpointing, so backward recomputes its logits instead of keeping them
          (about +5% of the FLOPs at d20, -24 GiB at device batch 32);
        - with gradients on CPU only when `loss_chunk_rows` is given: the default CPU training
          path is the plain one, bit for bit as before.
        """
        B, T = idx.size()
        if T > self.cos.size(1):
            raise ValueError(f"sequence of {T} tokens is longer than the rotary cache ({self.cos.size(1)})")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        x = norm(x)
        if targets is not None:
            rows = loss_chunk_rows or self.default_chunk_rows()
            if loss_chunk_rows or not torch.is_grad_enabled() or (x.is_cuda and rows < B * T):
                return self._chunked_loss(x, targets, loss_reduction, rows)
        logits = self._logits(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1).long(), ignore_index=-1, reduction=loss_reduction
        )
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """LM head, crop the vocabulary padding, softcap in fp32."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        logits = logits.float()
        if torch.is_grad_enabled():
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        # in place without autograd: the same ops, the same bits, one fp32 copy instead of four
        return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)

    def default_chunk_rows(self) -> int:
        """Positions per chunk of the loss: about LOSS_CHUNK_BYTES of fp32 logits."""
        return max(1, LOSS_CHUNK_BYTES // (4 * self.config.vocab_size))

    def _chunk_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x), targets, ignore_index=-1, reduction="none")

    # Eager even inside torch.compile (a graph break): activation checkpointing is a
    # higher-order op to dynamo, which compiled DDP does not bucket (pytorch#104674); eager,
    # it is plain autograd, and each chunk's memory is bounded anyway.
    @torch.compiler.disable
    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor, loss_reduction: str, rows: int):
        B, T, C = x.size()
        flat_x, flat_y = x.reshape(-1, C), targets.reshape(-1).long()
        head = self._chunk_loss
        if torch.is_grad_enabled():  # keep only the chunk's input; backward recomputes its logits
            head = functools.partial(checkpoint, self._chunk_loss, use_reentrant=False)
        losses = torch.cat([head(flat_x[i : i + rows], flat_y[i : i + rows]) for i in range(0, B * T, rows)])
        if loss_reduction == "none":
            return losses.view(B, T)
        if loss_reduction == "sum":
            return losses.sum()
        if loss_reduction == "mean":  # cross_entropy's mean: over the targets that are not ignored
            return losses.sum() / (flat_y != -1).sum()
        raise ValueError(f"loss_reduction={loss_reduction!r}: expected 'mean', 'sum' or 'none'")


def build_model(config: GPTConfig, device: torch.device | str = "cpu") -> GPT:
    """Build on the meta device, then materialise on `device` and init (no wasted CPU init for big models)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
