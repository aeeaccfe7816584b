"""fp8 matmuls for training (train.fp8): nanochat HEAD's tensorwise recipe (nanochat/fp8.py, MIT), on the GPUs that have them.

Notable:
- The math is nanochat's, line for line: each of a Linear's three matmuls quantizes its
  operands with one scale per tensor (inputs and weights e4m3, gradients e5m2) and runs
  torch._scaled_mm; fast accumulation in the forward only. Weights stay fp32 (the
  optimizer's), so only the matmuls change. tests/test_fp8.py checks the forward and both
  gradients against nanochat's own module, bit for bit.
- Which layers: nanochat's filter (both dims divisible by 16 and the smaller >= 128, the
  fp8 kernels' constraints, and below that the casts cost more than they save).
- Where: fp8 tensor cores, CUDA compute capability 8.9+ (H100/H200, L4/L40, RTX 4090).
  Elsewhere the run trains without fp8 and says why in one line (`unsupported`); PyTorch
  emulates _scaled_mm on a CPU, slowly, which NANOFORGE_FP8_ON_CPU=1 allows for tests.
- Evaluation (val BPB, samples, the evaluate stage) runs in the run's dtype without fp8,
  as nanochat's (`full_precision` swaps the plain Linear back for the duration).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn

CPU_ENV = "NANOFORGE_FP8_ON_CPU"  # tests only: fp8 on the CPU through PyTorch's emulated _scaled_mm
MIN_CAPABILITY = (8, 9)
EPS = 1e-12  # the scale of an all-zero tensor


@torch.no_grad()
def _to_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in fp8 with one scale for the whole tensor, the inverse scale _scaled_mm wants)."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.float().abs().max()
    scale = (fp8_max / amax.double().clamp(min=EPS)).float()  # float64: compile and eager agree (torchao's reason)
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)  # saturate: a plain cast wraps
    return x_fp8, scale.reciprocal()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides: _scaled_mm's second operand must be laid out so."""
    return x.t().contiguous().t()


@torch._dynamo.allow_in_graph  # one opaque node for torch.compile, as nanochat's
class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_2d, weight):
        x_fp8, x_inv = _to_fp8(input_2d, torch.float8_e4m3fn)
        w_fp8, w_inv = _to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        # weight_fp8 is [N, K] contiguous: its .t() is already column-major
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=input_2d.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = _to_fp8(grad_output, torch.float8_e5m2)  # gradients: range over precision
        grad_input = torch._scaled_mm(g_fp8, _col_major(w_fp8), scale_a=g_inv, scale_b=w_inv,
                                      out_dtype=grad_output.dtype, use_fast_accum=False)
        grad_weight = torch._scaled_mm(g_fp8.t().contiguous(), _col_major(x_fp8), scale_a=g_inv, scale_b=x_inv,
                                       out_dtype=grad_output.dtype, use_fast_accum=False)
        return grad_input, grad_weight


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in fp8; the weight (and bias) are the original module's, shared."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.to(torch.bfloat16)  # _scaled_mm outputs a reduced dtype; autocast does not reach inside
        out = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_linear(cls, mod: nn.Linear) -> "Float8Linear":
        with torch.device("meta"):  # a shell without memory; then the original's parameters
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight, new.bias = mod.weight, mod.bias
        return new


def eligible(mod: nn.Module) -> bool:
    """nanochat's filter: the fp8 kernels need dims divisible by 16; below 128 the casts cost more."""
    return (isinstance(mod, nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
            and min(mod.in_features, mod.out_features) >= 128)


def unsupported(device: torch.device) -> str | None:
    """Why this device cannot train in fp8, or None when it can."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= MIN_CAPABILITY:
            return None
        return (f"{torch.cuda.get_device_name(device)} is compute capability {cap[0]}.{cap[1]}; fp8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (H100/H200, L4/L40, RTX 4090)")
    if device.type == "cpu" and os.environ.get(CPU_ENV) == "1":
        return None
    return f"fp8 matmuls need a CUDA GPU of compute capability 8.9+ (H100/H200, L4/L40), not {device.type}"


def convert(model: nn.Module) -> tuple[int, int]:
    """Swap every eligible nn.Linear for a Float8Linear in place; (converted, all Linears)."""
    total = sum(isinstance(m, nn.Linear) for m in model.modules())

    def walk(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            walk(child)
            if eligible(child) and not isinstance(child, Float8Linear):
                setattr(parent, name, Float8Linear.from_linear(child))

    walk(model)
    return sum(isinstance(m, Float8Linear) for m in model.modules()), total


@contextmanager
def full_precision(model: nn.Module):
    """Plain nn.Linear in place of each Float8Linear while inside (same parameters), restored after."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Float8Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("meta"):
                plain = nn.Linear(mod.in_features, mod.out_features, bias=False)
            plain.weight, plain.bias = mod.weight, mod.bias
            setattr(parent, attr, plain)
            swapped.append((parent, attr, mod))
    try:
        yield model
    finally:
        for parent, attr, mod in swapped:
            setattr(parent, attr, mod)
