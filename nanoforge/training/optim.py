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

import math
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


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float,
                  warmup_steps: int = 0) -> float:
    """nanochat's schedule: linear warmup, constant, linear warmdown to final_lr_frac.

    The warmup is the longer of warmup_ratio (the FineWeb-era key) and warmup_steps (HEAD's)."""
    warmup = max(round(warmup_ratio * num_iterations), warmup_steps)
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


# ---------------------------------------------------------------------------
# nanochat HEAD's (2026) Muon: Polar Express, NorMuon, cautious weight decay; per-group AdamW.
# Chosen by the train.recipe options (nanoforge/config.py); with the 2025 values of all of them
# `build_for_config` returns build_optimizers' optimizers, the FineWeb-era math bit for bit.

# Polar Express (arXiv 2505.16932) for 5 iterations, safety factor 2e-2, cushion 2, as nanochat HEAD
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORMUON_BETA2 = 0.9


def polar_express(G: Tensor, steps: int = 5) -> Tensor:
    """HEAD's orthogonalisation of a stack (n, rows, cols), in G's dtype: MuonEq row equilibration (every row
    scaled to the mean row norm), Polar Express iterations, then Muon+ (Frobenius norm snapped to
    sqrt(min(rows, cols)), the norm of an exactly semi-orthogonal matrix)."""
    X = G
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if G.size(-2) > G.size(-1):  # tall: the small Gram matrix is X^T X
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    current = X.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return X * ((min(G.size(-2), G.size(-1)) ** 0.5) / current).to(X.dtype)


def normuon_scale(g: Tensor, second: Tensor, beta2: float) -> Tensor:
    """NorMuon (arXiv 2510.05491), as HEAD: a per-neuron second moment (`second`, updated in place) evens out
    the update's row (or column) scales, keeping the update's overall norm."""
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second.lerp_(v_mean.to(second.dtype), 1 - beta2)
    step_size = second.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)


class Muon2026(Muon):
    """nanochat HEAD's Muon step: Nesterov momentum -> Polar Express (or the quintic Newton-Schulz) ->
    NorMuon -> (cautious) decoupled weight decay. Per group: `weight_decay` (scheduled by
    set_weight_decay), `orthogonalize`, `normuon`, `cautious`. Matrices of one shape are stacked.
    The orthogonalisation runs in bf16 on CUDA and in fp32 elsewhere (HEAD: its compute dtype)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 orthogonalize: str = "polar_express", normuon: bool = True, cautious: bool = True):
        super().__init__(params, lr=lr, momentum=momentum)
        for group in self.param_groups:
            group.update(weight_decay=weight_decay, orthogonalize=orthogonalize, normuon=normuon, cautious=cautious)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for shape, params in by_shape.items():
                self._step_stack(group, shape, params)
        return None

    def _step_stack(self, group: dict, shape: tuple, params: list[Tensor]) -> None:
        rows, cols = shape
        momentum = group["momentum"]
        grads, bufs, seconds = [], [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["second_momentum_buffer"] = p.new_zeros((rows, 1) if rows >= cols else (1, cols))
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
            seconds.append(state["second_momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        g = torch.stack(torch._foreach_lerp(grads, bufs, momentum))
        X = g.bfloat16() if g.is_cuda else g
        if group["orthogonalize"] == "polar_express":
            X = polar_express(X, group["ns_steps"])
        else:
            X = zeropower_via_newtonschulz5(X, group["ns_steps"])
        g = X.to(params[0].dtype)
        if group["normuon"]:
            second = torch.stack(seconds)
            g = normuon_scale(g, second, NORMUON_BETA2)
            torch._foreach_copy_(seconds, list(second.unbind(0)))
        stacked = torch.stack(params)
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        decay = lr * group["weight_decay"] * stacked
        if group["cautious"]:  # decay only where the update pushes the same way (HEAD: mask g*p >= 0)
            decay = decay * ((g * stacked) >= 0)
        stacked.sub_(lr * g + decay)
        torch._foreach_copy_(params, list(stacked.unbind(0)))


# AdamW per group as nanochat HEAD's setup_optimizer: (lr factor, betas, weight decay); lr factor
# multiplies embedding_lr (x s) for the embeddings, scalar_lr for resid/x0, and is absolute for smear
ADAMW_2026 = {
    "lm_head": ((0.8, 0.96), 0.01),
    "embedding": ((0.8, 0.995), 0.001),
    "value_embeds": ((0.8, 0.995), 0.01),
    "resid": ((0.8, 0.95), 0.05),
    "x0": ((0.96, 0.95), 0.0),
    "smear": ((0.8, 0.95), 0.0),
}
SMEAR_LR = 0.2  # HEAD: smear gate and the smear/backout lambdas, unscaled


def is_2025(cfg) -> bool:
    """Every optimizer option at its FineWeb-era value (then the optimizers are build_optimizers')."""
    from nanoforge.config import RECIPES

    keys = ("muon_orthogonalize", "normuon", "muon_weight_decay", "cautious_weight_decay", "adamw_groups")
    return all(cfg.option(k) == RECIPES["2025"][k] for k in keys)


def build_for_config(model, cfg):
    """The optimizers of train config `cfg` (its recipe options): [AdamW, Muon or Muon2026]."""
    groups = model.param_groups()
    if is_2025(cfg) and set(groups) == {"matrix", "embedding", "lm_head"}:
        return build_optimizers(model, cfg.matrix_lr, cfg.option("embedding_lr"), cfg.option("unembedding_lr"),
                                cfg.weight_decay)
    s = adam_lr_scale(model.config.n_embd)
    scalar_lr, embedding_lr = cfg.option("scalar_lr"), cfg.option("embedding_lr")
    lrs = {"lm_head": cfg.option("unembedding_lr") * s, "embedding": embedding_lr * s,
           "value_embeds": embedding_lr * s * 0.5, "resid": scalar_lr * 0.01, "x0": scalar_lr, "smear": SMEAR_LR}
    adam_groups = []
    for name in ("lm_head", "embedding", "value_embeds", "resid", "x0", "smear"):
        if name not in groups:
            continue
        betas, wd = ADAMW_2026[name]
        if name in ("lm_head", "embedding") and cfg.option("adamw_groups") == "2025":
            betas, wd = ADAM_BETAS, cfg.weight_decay
        adam_groups.append(dict(params=groups[name], lr=lrs[name], betas=betas, weight_decay=wd, name=name))
    device = groups["lm_head"][0].device
    adamw = torch.optim.AdamW(adam_groups, eps=ADAM_EPS, fused=device.type in ("cuda", "cpu"))
    if is_2025(cfg):
        muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=MOMENTUM_START)
    else:
        muon = Muon2026(groups["matrix"], lr=cfg.matrix_lr, momentum=MOMENTUM_START,
                        weight_decay=cfg.option("muon_weight_decay"), orthogonalize=cfg.option("muon_orthogonalize"),
                        normuon=cfg.option("normuon"), cautious=cfg.option("cautious_weight_decay"))
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
            group["initial_weight_decay"] = group.get("weight_decay", 0.0)
    return [adamw, muon]


def momentum_for(cfg, step: int, num_iterations: int) -> float:
    """Muon momentum at `step`: 2025 muon_momentum; 2026 HEAD's (0.85 -> 0.97 over 400 steps, then
    0.97 -> 0.90 over the LR warmdown)."""
    if cfg.option("momentum_schedule") == "2025":
        return muon_momentum(step)
    warmdown = round(cfg.option("warmdown_ratio") * num_iterations)
    start = num_iterations - warmdown
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= start:
        progress = (step - start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def weight_decay_multiplier(cfg, step: int, num_iterations: int) -> float:
    """The Muon weight decay at `step` over its initial value: 1, or HEAD's cosine to 0 at the end."""
    if cfg.option("weight_decay_schedule") == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / num_iterations))
    return 1.0


def set_weight_decay(optimizers, multiplier: float) -> None:
    """Schedule Muon2026's weight decay (AdamW's stays constant, as HEAD)."""
    for opt in optimizers:
        if isinstance(opt, Muon2026):
            for group in opt.param_groups:
                group["weight_decay"] = group["initial_weight_decay"] * multiplier
