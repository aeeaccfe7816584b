"""CORE rows scored with their shared prefix computed once: one packed "tree" per item.

Notable:
- The options of one item share a long token prefix (the few-shot examples, and for
  multiple choice the question too). nanochat forwards every option in full. Here
  the rows of an item that share a prefix become ONE sequence: the prefix once, then
  each option's continuation, with its own positions (each continuation starts at
  the prefix length, so rotary embeddings see what the full row would) and an
  attention mask: a continuation token sees the prefix and the earlier tokens of its
  own continuation, nothing of the other options. This is the same computation as
  a forward over each full row; only float rounding differs (different matmul
  shapes), which can flip a decision only where two options tie within rounding.
- It is the equivalent of scoring each continuation from the prefix's key/value
  cache, in a single forward, so groups of many items still batch together.
- Which rows share what is read off the tokens, never assumed: rows of an item are
  grouped while their common prefix is at least `MIN_SHARED` tokens; cropping a long
  row to the context moves its start, so cropped options of different lengths do
  not share (their hidden states differ) and are scored as rows of their own.
- Only the scored positions go through the last block's queries, attention output and
  MLP, and through the LM head (nanochat computes every position to the logits and
  their cross-entropy); the last block's keys and values still cover every position.
- Needs nanoforge's GPT (it uses the model's layers directly); `supports(model)` says
  whether a model can take this path. The math mirrors `GPT.forward`; the tests
  check the two agree, so a change to one that is not made to the other fails there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoforge.model.gpt import GPT, apply_rotary_emb, norm

MIN_SHARED = 4  # rows of an item join a group when they share at least this many leading tokens


def supports(model) -> bool:
    return isinstance(model, GPT)


def group_rows(rows) -> list[tuple[list[int], int]]:
    """[(row indices, shared prefix length)]: rows of one item that share a leading token run.

    The shared length never passes a row's span start, so every scored position but the
    first lies in a continuation (the first may be the prefix's last position).
    """
    groups: list[tuple[list[int], int]] = []
    open_groups: dict[int, list[list]] = {}  # item -> [[members, shared], ...]
    for r, (item, _option, tokens, start, _end) in enumerate(rows):
        placed = False
        for g in open_groups.setdefault(item, []):
            first = rows[g[0][0]][2]
            n = 0
            limit = min(len(first), len(tokens), g[1])
            while n < limit and first[n] == tokens[n]:
                n += 1
            if n >= MIN_SHARED:
                g[0].append(r)
                g[1] = min(n, start)
                placed = True
                break
        if not placed:
            open_groups[item].append([[r], start])
    for item_groups in open_groups.values():
        groups += [(members, shared) for members, shared in item_groups]
    return groups


def packed_length(rows, members: list[int], shared: int) -> int:
    return shared + sum(len(rows[r][2]) - shared for r in members)


def _layout(rows, members, shared):
    """Token ids, positions, segment ids (0 = prefix, j = continuation j) and scored (index, target) per row."""
    first = rows[members[0]][2]
    ids, pos, seg = list(first[:shared]), list(range(shared)), [0] * shared
    scored = []
    for j, r in enumerate(members, 1):
        tokens, start, end = rows[r][2], rows[r][3], rows[r][4]
        offset = len(ids) - shared  # packed index of row position p (p >= shared) is p + offset
        ids += tokens[shared:]
        pos += range(shared, len(tokens))
        seg += [j] * (len(tokens) - shared)
        # logits at row position p predict token p + 1; p = shared - 1 is the prefix's last position
        where = [p if p < shared else p + offset for p in range(start - 1, end - 1)]
        scored.append((where, tokens[start:end]))
    return ids, pos, seg, scored


def _attend(attn, x, cos, sin, mask):
    """CausalSelfAttention.forward with an explicit mask instead of is_causal."""
    B, T, _ = x.size()
    q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.c_v(x).view(B, T, attn.n_kv_head, attn.head_dim)
    q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    q, k = norm(q), norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.n_head != attn.n_kv_head)
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


def _query_slots(select: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row, the selected positions padded to the longest count: (idx (B, Q), rank (N,)).

    Selected position n lives at idx[select[n, 0], rank[n]]; padding slots point at position 0.
    """
    b_of = select[:, 0]
    counts = torch.bincount(b_of, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(b_of, stable=True)
    rank = torch.empty_like(b_of)
    rank[order] = torch.arange(len(b_of), device=b_of.device) - starts[b_of[order]]
    idx = torch.zeros((batch, max(1, int(counts.max()))), dtype=torch.long, device=b_of.device)
    idx[b_of, rank] = select[:, 1]
    return idx, rank


def _last_block(block, x, cos, sin, mask, idx):
    """The last block at the positions `idx` (B, Q) only: keys and values still come from every position.

    Nothing after the last block looks at the other positions, so their queries, attention
    output, projection and MLP (about 85% of the block's work) are never computed.
    """
    attn = block.attn
    B, T, C = x.size()
    rows = torch.arange(B, device=x.device)[:, None]
    h = norm(x)
    k = attn.c_k(h).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.c_v(h).view(B, T, attn.n_kv_head, attn.head_dim)
    k = norm(apply_rotary_emb(k, cos, sin))
    Q = idx.size(1)
    q = attn.c_q(h[rows, idx]).view(B, Q, attn.n_head, attn.head_dim)
    q = norm(apply_rotary_emb(q, cos[rows, idx], sin[rows, idx]))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[rows, 0, idx][:, None],
                                       enable_gqa=attn.n_head != attn.n_kv_head)
    xq = x[rows, idx] + attn.c_proj(y.transpose(1, 2).contiguous().view(B, Q, -1))
    return xq + block.mlp(norm(xq))


def tree_forward(model: GPT, ids: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                 select: torch.Tensor) -> torch.Tensor:
    """Softcapped float32 logits (N, vocab) at the packed positions `select` (N, 2) = (batch, index).

    `seg` -1 marks padding: it attends only to other padding, and nothing attends to it.
    """
    if int(pos.max()) >= model.cos.size(1):
        raise ValueError(f"position {int(pos.max())} is past the rotary cache ({model.cos.size(1)})")
    cos, sin = model.cos[0][pos], model.sin[0][pos]  # (B, T, 1, D/2)
    same = seg[:, None, :] == seg[:, :, None]
    mask = (pos[:, None, :] <= pos[:, :, None]) & (same | (seg[:, None, :] == 0))
    mask = mask[:, None]  # (B, 1, T, T): query rows, key columns
    x = norm(model.transformer.wte(ids))
    blocks = model.transformer.h
    for block in blocks[:-1]:
        x = x + _attend(block.attn, norm(x), cos, sin, mask)
        x = x + block.mlp(norm(x))
    idx, rank = _query_slots(select, ids.size(0))
    x = _last_block(blocks[-1], x, cos, sin, mask, idx)[select[:, 0], rank]
    return model._logits(norm(x))  # the model's own head: vocabulary crop, fp32 softcap


@torch.no_grad()
def score_rows_shared(model: GPT, rows, pad_id: int, runtime, batch_tokens: int):
    """What `core.score_rows` returns (mean loss over each row's span, exact greedy match), plus token counts.

    Groups are sorted by packed length and batched while groups * longest <= batch_tokens.
    Returns (mean_loss, exact, {"row_tokens": sum of row lengths, "packed_tokens": tokens forwarded}).
    """
    groups = group_rows(rows)
    sizes = [packed_length(rows, m, s) for m, s in groups]
    order = sorted(range(len(groups)), key=lambda g: -sizes[g])
    mean_loss, exact = [0.0] * len(rows), [False] * len(rows)
    pos_ = 0
    while pos_ < len(order):
        longest = sizes[order[pos_]]
        batch = order[pos_: pos_ + max(1, batch_tokens // longest)]
        pos_ += len(batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        pos = torch.zeros((len(batch), longest), dtype=torch.long)
        seg = torch.full((len(batch), longest), -1, dtype=torch.long)
        select, targets, owner = [], [], []
        for b, g in enumerate(batch):
            members, shared = groups[g]
            g_ids, g_pos, g_seg, scored = _layout(rows, members, shared)
            n = len(g_ids)
            ids[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(g_ids), torch.tensor(g_pos), torch.tensor(g_seg)
            for r, (where, wanted) in zip(members, scored):
                select += [(b, w) for w in where]
                targets += wanted
                owner += [r] * len(wanted)
        dev = runtime.device
        select_t = torch.tensor(select, dtype=torch.long, device=dev)
        with runtime.autocast():
            logits = tree_forward(model, ids.to(dev), pos.to(dev), seg.to(dev), select_t)
        wanted = torch.tensor(targets, dtype=torch.long, device=dev)
        losses = F.cross_entropy(logits.float(), wanted, reduction="none")
        hits = (logits.argmax(dim=-1) == wanted).tolist()
        losses = losses.tolist()
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        misses: dict[int, int] = {}
        # summed in scored-position order in float64, then divided: the same mean a full row gives
        for r, loss, hit in zip(owner, losses, hits):
            sums[r] = sums.get(r, 0.0) + loss
            counts[r] = counts.get(r, 0) + 1
            misses[r] = misses.get(r, 0) + (not hit)
        for r in sums:
            mean_loss[r] = sums[r] / counts[r]
            exact[r] = misses[r] == 0
    stats = {"row_tokens": sum(len(r[2]) for r in rows), "packed_tokens": sum(sizes)}
    return mean_loss, exact, stats
