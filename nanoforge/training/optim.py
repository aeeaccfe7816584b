"""The optimizers and their schedules: Muon for the block matrices, AdamW for the rest.

Notable:
- Muon (nanochat/Keller Jordan): SGD momentum with Nesterov, then the update is
  orthogonalised by 5 quintic Newton-Schulz steps (coefficients 3.4445, -4.7750,
  2.0315) in bfloat16 after normalising by the Frobenius norm, and scaled by
  sqrt(max(1, rows/cols)). Matrices of one shape are stacked and orthogonalised
  in one batched call (fewer, larger matmuls).
- AdamW for the embedding (lr 0.2*s) and LM head (lr 0.004*s), s = (width/768)^-0.5,
  betas (0.8, 0.95), eps 1e-10.
- Under DDP the gradients are already averaged when `step()` runs, so every rank
  runs the same update on the same numbers and the replicas stay identical.
- Schedules are plain functions of the step: LR multiplier (warmup, constant,
  linear warmdown to final_lr_frac) and Muon momentum (0.85 -> 0.95 over 300 steps).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
MOMENTUM_START, MOMENTUM_END, MOMENTUM_WARMUP = 0.85, 0.95, 300


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G (rows, cols) or a stack (n, rows, cols): U V^T of its SVD, in bfloat16."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    # b*A + c*A@A and a*X + B@X as fused multiply-adds: the same math, fewer passes over memory
    fma = torch.baddbmm if X.ndim == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = fma(A, A, A, beta=b, alpha=c)
        X = fma(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalisation, for 2-D parameters only."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        # a list of tensors, or of param groups (dicts; shard.py builds a rank's share that way)
        for p in (q for item in params for q in (item["params"] if isinstance(item, dict) else [item])):
            if p.ndim != 2:
                raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # a tall matrix is orthogonalised as its transpose (as nanochat does), so stack it with
            # the wide ones of that shape: one batched call, and contiguous operands
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[(min(p.shape), max(p.shape))].append(p)
            momentum = group["momentum"]
            for params in by_shape.values():
                grads, bufs = [], []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    grads.append(p.grad)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                wide = torch.stack([u.mT if u.size(0) > u.size(1) else u for u in updates])
                ortho = zeropower_via_newtonschulz5(wide, steps=group["ns_steps"])
                for p, o in zip(params, ortho.unbind(0)):
                    rows, cols = p.shape
                    p.add_(o.mT if rows > cols else o, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)
        return None


def adam_lr_scale(width: int) -> float:
    return (width / 768) ** -0.5


def build_optimizers(model, matrix_lr: float, embedding_lr: float, unembedding_lr: float, weight_decay: float = 0.0):
    """[AdamW(embedding, LM head), Muon(block matrices)], each group remembering its `initial_lr`."""
    groups = model.param_groups()
    s = adam_lr_scale(model.config.n_embd)
    device = groups["lm_head"][0].device
    adam_kwargs = dict(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    if device.type in ("cuda", "cpu"):
        adam_kwargs["fused"] = True
    adamw = torch.optim.AdamW(
        [
            dict(params=groups["lm_head"], lr=unembedding_lr * s, name="lm_head"),
            dict(params=groups["embedding"], lr=embedding_lr * s, name="embedding"),
        ],
        **adam_kwargs,
    )
    muon = Muon(groups["matrix"], lr=matrix_lr, momentum=MOMENTUM_START)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """nanochat's schedule: linear warmup, constant, linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_WARMUP, 1.0)
    return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_END


def apply_schedules(optimizers, lr_mult: float, momentum: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum
