"""ZeRO-1 under DDP: each rank keeps, and steps, the optimizer state of its share of the parameters only.

Notable:
- DDP all-reduces the gradients as before. Then each parameter (or row range of one) is
  updated by one rank, its owner, which keeps its optimizer state; the owners broadcast the
  new values, one flat buffer per owner and dtype. Every update is the same math on the same
  numbers as in the unsharded step, so the weights are bit for bit those of a run without
  sharding (tests/test_shard.py), and per-rank optimizer state is ~1/world (bench/memory.py).
- Ownership (`assign`) is computed from the shapes alone, so every rank draws the same table.
  AdamW is elementwise: each large parameter is cut into `world` row ranges, one per rank
  (whole, the embedding or LM head alone would be more than a rank's share at 8 ranks).
  Any other optimizer (Muon orthogonalises whole matrices) gets whole parameters: each goes
  to the least-loaded rank, largest first, so
  same-shape matrices spread round-robin and a rank still runs Newton-Schulz on its share of
  each shape in one batched call (1/world of the matrices, not all of them).
- Checkpoints keep one process's format, whatever the world size: `state_dicts()` gathers the
  owners' state to rank 0 piece by piece onto the CPU (never the whole state on every rank),
  and `load_state_dicts()` keeps only the owned pieces of a full state. A state.pt from any
  world size, or from before sharding, resumes at any other.
- The broadcast also re-synchronises the replicas every step; agree.check_replicas still
  compares weights and buffers at every checkpoint. World size 1 never comes here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

# a parameter this small is not worth cutting into row ranges: whole, to the least-loaded rank
SPLIT_MIN_NUMEL = 1 << 16


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of parameter `index` (numbered as in that optimizer's state_dict) of optimizer `opt`."""

    opt: int
    group: int
    index: int
    lo: int
    hi: int
    owner: int
    split: bool  # a row range of the parameter, not all of it


def _rows(p: torch.Tensor) -> int:
    return p.shape[0] if p.ndim else 1


def assign(optimizers, world: int) -> list[Piece]:
    """Every parameter's owner(s), balanced by optimizer-state elements (AdamW keeps 2 a weight, Muon 1)."""
    load = [0] * world
    pieces, whole = [], []
    for k, opt in enumerate(optimizers):
        elementwise = isinstance(opt, torch.optim.AdamW)  # only there is a row range's update its own business
        per_weight = 2 if elementwise else 1
        index = 0
        for g, group in enumerate(opt.param_groups):
            for p in group["params"]:
                rows = _rows(p)
                if not elementwise or rows < world or p.numel() < SPLIT_MIN_NUMEL:
                    whole.append((p.numel() * per_weight, k, g, index, rows))
                else:
                    for r in range(world):
                        lo, hi = rows * r // world, rows * (r + 1) // world
                        pieces.append(Piece(k, g, index, lo, hi, r, True))
                        load[r] += (hi - lo) * (p.numel() // rows) * per_weight
                index += 1
    # largest first (sorted is stable: ties keep model order, so one shape's matrices go round-robin)
    for cost, k, g, index, rows in sorted(whole, key=lambda w: -w[0]):
        owner = min(range(world), key=lambda r: load[r])
        pieces.append(Piece(k, g, index, 0, rows, owner, False))
        load[owner] += cost
    return sorted(pieces, key=lambda pc: (pc.opt, pc.index, pc.lo))


class ShardedOptimizers:
    """Stands in for the list [AdamW, Muon] under DDP: iterating it yields this rank's own optimizers
    (so the schedules set their lr and momentum), `step()` steps them and broadcasts the results."""

    def __init__(self, optimizers):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.full = list(optimizers)  # never stepped (so they hold no state): the parameters and the layout
        self.params = [[p for g in opt.param_groups for p in g["params"]] for opt in self.full]
        self.pieces = assign(self.full, self.world)
        self.local, self.mine, self.group_pieces = [], [], []
        for k, opt in enumerate(self.full):
            groups = [{**{key: v for key, v in g.items() if key != "params"}, "params": []} for g in opt.param_groups]
            owned = [[] for _ in opt.param_groups]
            for pc in self.pieces:
                if pc.opt == k and pc.owner == self.rank:
                    t = self.view(pc)
                    groups[pc.group]["params"].append(t)
                    owned[pc.group].append(pc)
                    self.mine.append((pc, t))
            kwargs = {key: v for key, v in opt.defaults.items() if key in inspect.signature(type(opt)).parameters}
            local = type(opt)(groups, **kwargs)
            for mine, full in zip(local.param_groups, opt.param_groups):  # a constructor may reset group options
                mine.update({key: v for key, v in full.items() if key != "params"})
            self.local.append(local)
            self.group_pieces.append(owned)
        # what each owner broadcasts: its pieces, by dtype, in the table's order (the same on every rank)
        self.buckets = []
        for owner in range(self.world):
            by_dtype: dict[torch.dtype, list] = {}
            for pc in self.pieces:
                if pc.owner == owner:
                    v = self.view(pc)
                    by_dtype.setdefault(v.dtype, []).append(v)
            self.buckets += [(owner, views) for views in by_dtype.values()]

    def view(self, pc: Piece) -> torch.Tensor:
        """The piece's weights: the parameter itself when whole (Muon's state stays keyed by it), else a row view."""
        p = self.params[pc.opt][pc.index]
        return p.detach()[pc.lo:pc.hi] if pc.split else p

    def __iter__(self):
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)

    @torch.no_grad()
    def step(self) -> None:
        for pc, t in self.mine:
            if pc.split:  # a row view's gradient: the same rows of the synchronised gradient
                grad = self.params[pc.opt][pc.index].grad
                t.grad = None if grad is None else grad[pc.lo:pc.hi]
        for opt in self.local:
            opt.step()
        for pc, t in self.mine:
            if pc.split:
                t.grad = None
        for owner, views in self.buckets:
            if owner == self.rank:
                flat = torch.cat([v.reshape(-1) for v in views])
            else:
                flat = torch.empty(sum(v.numel() for v in views), dtype=views[0].dtype, device=views[0].device)
            dist.broadcast(flat, src=owner)
            if owner != self.rank:
                for v, chunk in zip(views, flat.split([v.numel() for v in views])):
                    v.copy_(chunk.view_as(v))

    def _owned_state(self) -> dict:
        """{(opt, index, lo): {name: tensor}} of this rank's pieces that have state."""
        out = {}
        for opt, owned in zip(self.local, self.group_pieces):
            for group, pieces in zip(opt.param_groups, owned):
                for t, pc in zip(group["params"], pieces):
                    if opt.state.get(t):
                        out[(pc.opt, pc.index, pc.lo)] = opt.state[t]
        return out

    def state_dicts(self) -> list[dict] | None:
        """One process's optimizer state dicts, on rank 0's CPU (None on the others). Every rank must call it."""
        owned = self._owned_state()
        layout = {key: {name: (tuple(v.shape), v.dtype) for name, v in st.items()} for key, st in owned.items()}
        layouts = [None] * self.world
        dist.all_gather_object(layouts, layout)
        main = self.rank == 0
        states = [{} for _ in self.full]
        for pc in self.pieces:  # the same order on every rank: sends and receives pair up
            key = (pc.opt, pc.index, pc.lo)
            names = layouts[pc.owner].get(key)
            if names is None:
                continue
            p = self.params[pc.opt][pc.index]
            for name, (shape, dtype) in sorted(names.items()):
                if pc.owner == self.rank:
                    tensor = owned[key][name]
                    if not main:
                        dist.send(tensor.contiguous(), dst=0)
                        continue
                elif main:
                    tensor = torch.empty(shape, dtype=dtype, device=p.device)
                    dist.recv(tensor, src=pc.owner)
                else:
                    continue
                slot = states[pc.opt].setdefault(pc.index, {})
                if pc.split and tensor.ndim and tensor.shape[0] == pc.hi - pc.lo:
                    if name not in slot:
                        slot[name] = torch.empty((_rows(p), *tensor.shape[1:]), dtype=dtype)
                    slot[name][pc.lo:pc.hi].copy_(tensor)
                elif name not in slot:  # whole, or a per-parameter scalar (AdamW's step) taken once
                    slot[name] = tensor.cpu().clone()
        if not main:
            return None
        out = []
        for opt, local, state in zip(self.full, self.local, states):
            groups = opt.state_dict()["param_groups"]  # the parameter numbering of one process
            for group, live in zip(groups, local.param_groups):
                group.update({key: v for key, v in live.items() if key != "params"})  # lr and momentum as scheduled
            out.append({"state": dict(sorted(state.items())), "param_groups": groups})
        return out

    def load_state_dicts(self, states: list[dict]) -> None:
        """Keep this rank's pieces of one process's state dicts (a checkpoint from any world size)."""
        for k, (opt, sd) in enumerate(zip(self.local, states)):
            full_groups = self.full[k].param_groups
            if len(sd["param_groups"]) != len(full_groups) or any(
                    len(s["params"]) != len(f["params"]) for s, f in zip(sd["param_groups"], full_groups)):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
            state, groups, n = {}, [], 0
            for saved, pieces in zip(sd["param_groups"], self.group_pieces[k]):
                ids = []
                for pc in pieces:
                    full_index = saved["params"][pc.index - _first_index(full_groups, pc.group)]
                    entry = sd["state"].get(full_index)
                    if entry is not None:
                        shape = self.params[k][pc.index].shape
                        state[n] = {name: (v[pc.lo:pc.hi] if pc.split and v.ndim and v.shape == shape else v).clone()
                                    for name, v in entry.items()}
                    ids.append(n)
                    n += 1
                groups.append({**{key: v for key, v in saved.items() if key != "params"}, "params": ids})
            opt.load_state_dict({"state": state, "param_groups": groups})


def _first_index(groups, g: int) -> int:
    """The state_dict number of group g's first parameter (numbered across the groups in order)."""
    return sum(len(groups[i]["params"]) for i in range(g))
