"""Text from the model: greedy continuations of fixed prompts and free samples.

Notable:
- Simple recompute, no KV cache: each new token runs the whole (cropped) sequence
  again. For the few dozen tokens a report shows this costs little and works with
  any model that maps ids (B, T) to logits (B, T, V).
- Sequences longer than the model's context keep their last tokens, as in CORE.
- Every prompt starts with BOS; the empty prompt "" is BOS alone, which is how the
  unconditioned samples are drawn. A generated BOS ends that text (a new document
  would begin there).
- Prompts with the same token length run as one batch; temperature 0 is argmax, so
  greedy output never depends on the seed. Sampling uses its own seeded generator
  and leaves the global RNG alone.
"""

from __future__ import annotations

from typing import Sequence

import torch


def model_context(model) -> int | None:
    """The longest sequence the model was built for: `config.sequence_len`, else `max_seq_len`, else None."""
    config = getattr(model, "config", None)
    length = getattr(config, "sequence_len", None) if config is not None else None
    return length if length is not None else getattr(model, "max_seq_len", None)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 42,
    runtime=None,
) -> list[str]:
    """Continue each prompt by up to `max_tokens` tokens; returns the completions (prompt excluded).

    temperature 0 = greedy (argmax); > 0 samples from softmax(logits / temperature) with a
    generator seeded by `seed`. `runtime` (optional) supplies the device's autocast.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = runtime.device if runtime is not None else _device(model)
    context = model_context(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    encoded = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    completions: list[list[int]] = [[] for _ in prompts]
    for length in sorted(groups):
        members = groups[length]
        idx = torch.tensor([encoded[i] for i in members], dtype=torch.long, device=device)
        done = torch.zeros(len(members), dtype=torch.bool, device=device)
        new_tokens = []
        for _ in range(max_tokens):
            window = idx if context is None else idx[:, -context:]
            if runtime is not None:
                with runtime.autocast():
                    logits = model(window)
            else:
                logits = model(window)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            new_tokens.append(nxt)
            done |= nxt == tokenizer.bos_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in members]
        for row, i in enumerate(members):
            ids = generated[row]
            if tokenizer.bos_id in ids:
                ids = ids[: ids.index(tokenizer.bos_id)]
            completions[i] = ids
    return [tokenizer.decode(ids) for ids in completions]
