"""nanochat's GPT (FineWeb era), one dial: depth; nanochat HEAD's 2026 options on top.

Notable:
- Rotary embeddings (base 10,000), no learned positions; QK norm after RoPE.
- Grouped-query attention: `n_kv_head` key/value heads shared by the query heads;
  attention is `scaled_dot_product_attention` (causal), except plain causal attention
  without GQA on a CPU: explicit matmuls in query blocks (`causal_attention_cpu`), 2x
  faster than PyTorch's CPU flash kernel in bf16 (the same math to float tolerance).
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
- `estimate_flops()` is nanochat's: 6*(matmul params) + 12*heads*head_dim*window summed
  over the layers (6*(params - embedding) + 12*L*heads*head_dim*T without the options).

The 2026 options (GPTConfig's fields; off, the model above is unchanged bit for bit), as
nanochat HEAD (92d63d4) writes them:
- value embeddings: an embedding per alternating layer (the last always) added to v with a
  per-head gate 3*sigmoid(W x[:12]) (ResFormer);
- window pattern: per-layer sliding windows as a boolean SDPA mask (works on CPU; a layer
  whose window covers the context takes the plain causal path);
- lambdas: x = resid_lambdas[i]*x + x0_lambdas[i]*x0 before each block;
- smear: x[t] += smear_lambda*sigmoid(W x[t,:24]) * x[t-1] after the embedding norm;
- backout: x -= backout_lambda * (the residual after layer L/2) before the final norm;
- init 2026: uniform with HEAD's scales, embedding N(0, 0.8), LM head N(0, 0.001), in HEAD's
  order of RNG draws (the same seed gives the same weights); rope_base, qk_scale.
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


def has_value_embed(layer: int, n_layer: int) -> bool:
    """nanochat HEAD's rule: alternating layers, the last always included."""
    return layer % 2 == (n_layer - 1) % 2


VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of x (HEAD)
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding (HEAD)


def window_masks(windows: list[int], T: int, device) -> dict[int, torch.Tensor | None]:
    """Per window size, the (T, T) boolean mask of a causal sliding window (None: plain causal).
    As nanochat's SDPA fallback: position t sees t-window .. t."""
    masks: dict[int, torch.Tensor | None] = {}
    row = torch.arange(T, device=device).unsqueeze(1)
    col = torch.arange(T, device=device).unsqueeze(0)
    for w in set(windows):
        masks[w] = None if w >= T else (col <= row) & ((row - col) <= w)
    return masks


CPU_ATTENTION_BLOCK = 128  # query rows per block of causal_attention_cpu


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention (B, H, T, D) as explicit matmuls, the queries in blocks of 128 rows.

    Why: on a CPU, PyTorch's flash-attention kernel runs at a fraction of the matmul peak (at
    nanochat's CPU point, seq 256 and head_dim 128, it was 20% of the bf16 step). Plain matmuls
    reach the peak, and block i of the queries only needs keys 0..end of block i, so the masked
    upper triangle is mostly skipped (3/4 of the full work at two blocks). Scores and softmax are
    fp32; the probabilities go back to q's dtype for the PV matmul, as flash attention does.
    Same math as `scaled_dot_product_attention(is_causal=True)` (test_gpt checks it)."""
    T, scale = q.size(2), q.size(-1) ** -0.5
    out = []
    for start in range(0, T, CPU_ATTENTION_BLOCK):
        end = min(T, start + CPU_ATTENTION_BLOCK)
        scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)).float() * scale
        visible = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(v.dtype)
        out.append(probs @ v[:, :, :end])
    return out[0] if len(out) == 1 else torch.cat(out, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_scale = config.qk_scale
        with_ve = config.value_embeds and has_value_embed(layer, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if with_ve else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a gate per kv head in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm
        if self.qk_scale != 1.0:  # sharper attention, the scale split between q and k (HEAD)
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_head != self.n_kv_head
        if mask is None and not gqa and q.device.type == "cpu":
            y = causal_attention_cpu(q, k, v)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
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
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, ve, mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.window_sizes = config.window_sizes()
        # the 2026 options' parameters exist only when on: the 2025 model keeps its exact parameter list
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({
                str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer) if has_value_embed(i, config.n_layer)
            })
        # 10x the training length, so sampling can run past it (as nanochat)
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.head_dim
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_base ** (channels / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init (config.init: 2025 or HEAD's 2026); also (re)computes the rotary buffers."""
        if self.config.init == "2026":
            self._init_2026()
        else:
            self._init_2025()
        self.reset_rotary()

    def _init_2025(self) -> None:
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
        self._init_scalars()

    def _init_scalars(self) -> None:
        """The 2026 options' scalars: HEAD's values (no random draws)."""
        c = self.config
        if c.lambdas:
            for i in range(c.n_layer):  # stronger residual and more embedding in early layers
                self.resid_lambdas[i] = 1.15 - (0.10 * i / max(c.n_layer - 1, 1))
                self.x0_lambdas[i] = 0.20 - (0.15 * i / max(c.n_layer - 1, 1))
        if c.smear:
            nn.init.zeros_(self.smear_lambda)
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)

    def _init_2026(self) -> None:
        """nanochat HEAD's init_weights, its random draws in its order (the same seed, the same weights)."""
        c = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * c.n_embd**-0.5  # uniform with the std of N(0, 1/width): no outliers
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s * 0.4, s * 0.4)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._init_scalars()
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if c.value_embeds:
            for ve in self.value_embeds.values():
                nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:  # slightly above neutral
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

    @torch.no_grad()
    def reset_rotary(self) -> None:
        cos, sin = self._rotary(self.rotary_seq_len, device=self.lm_head.weight.device)
        self.cos, self.sin = cos, sin

    # --- accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_embedding_params(self) -> int:
        """Lookups, not matmuls: the token embedding and the value embeddings."""
        n = self.transformer.wte.weight.numel()
        if self.config.value_embeds:
            n += sum(p.numel() for p in self.value_embeds.parameters())
        return n

    def num_matmul_params(self) -> int:
        """Every weight that multiplies the token stream (2 FLOPs per param forward): the nn.Linear ones."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6*(matmul params) + 12*heads*head_dim*min(window, T) per layer."""
        c = self.config
        attention = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in self.window_sizes)
        return 6 * self.num_matmul_params() + attention

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer split: matrices in the blocks (Muon), embedding and LM head (AdamW); with the 2026
        options also value_embeds, resid (resid_lambdas), x0 (x0_lambdas), smear (gate, smear and backout
        lambdas), all AdamW, as nanochat HEAD's setup_optimizer groups them."""
        groups = {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "lm_head": list(self.lm_head.parameters()),
        }
        c = self.config
        if c.value_embeds:
            groups["value_embeds"] = list(self.value_embeds.parameters())
        if c.lambdas:
            groups["resid"], groups["x0"] = [self.resid_lambdas], [self.x0_lambdas]
        smear = ([self.smear_gate.weight, self.smear_lambda] if c.smear else []) + (
            [self.backout_lambda] if c.backout else [])
        if smear:
            groups["smear"] = smear
        return groups

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
        x = self._trunk(idx, cos, sin)
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

    def _trunk(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Embedding, the blocks, the final norm: the residual stream the LM head reads."""
        c = self.config
        x = norm(self.transformer.wte(idx))
        if not (c.value_embeds or c.lambdas or c.smear or c.backout or c.window_pattern.upper().strip("L")):
            for block in self.transformer.h:  # the FineWeb-era model
                x = block(x, cos, sin)
            return norm(x)
        if c.smear and x.size(1) > 1:  # the previous token's embedding, gated, into each position
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        masks = window_masks(self.window_sizes, x.size(1), x.device)
        x0, x_backout, backout_layer = x, None, c.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if c.value_embeds and str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve, masks[self.window_sizes[i]])
            if i == backout_layer:
                x_backout = x
        if c.backout and x_backout is not None:  # remove low-level features before the head
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        return norm(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """LM head, crop the vocabulary padding, softcap in fp32."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        logits = logits.float()
        cap = self.config.softcap
        if torch.is_grad_enabled():
            return cap * torch.tanh(logits / cap)
        # in place without autograd: the same ops, the same bits, one fp32 copy instead of four
        return logits.div_(cap).tanh_().mul_(cap)

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
