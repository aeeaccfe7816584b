"""ZeRO-1 (training/shard.py): the owner table, and 2 real gloo ranks against one process, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nanoforge.model.gpt import build_model
from nanoforge.model.shape import config_for_depth
from nanoforge.training.checkpoint import load_checkpoint, save_checkpoint
from nanoforge.training.optim import Muon, apply_schedules, build_optimizers, muon_momentum
from nanoforge.training.shard import ShardedOptimizers, assign
from tests.test_train import EXACT, clone, columns, read_csv, run_train, template, write_params  # noqa: F401 (template: the fixture)

STEPS = 3  # per phase


def model_and_optimizers(device="cpu"):
    # depth 1 (width 64) with a 1024 vocabulary: the embedding and LM head are large enough to be split by rows
    torch.manual_seed(0)
    model = build_model(config_for_depth(1, 1024, 16), device)
    return model, build_optimizers(model, 0.02, 0.2, 0.004, weight_decay=0.1)


def fake_step(model, optimizers, step: int) -> None:
    """A synchronised gradient that depends only on the step (what DDP hands every rank), then the step."""
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
    apply_schedules(optimizers, 1.0 - 0.1 * step, muon_momentum(step))
    if isinstance(optimizers, ShardedOptimizers):
        optimizers.step()
    else:
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)


def state_numel(optimizers) -> int:
    return sum(v.numel() for opt in optimizers for st in opt.state.values() for v in st.values() if v.ndim)


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", world), rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        # phase A: fresh, 3 sharded steps, a checkpoint in one process's format
        model, opts = model_and_optimizers()
        sharded = ShardedOptimizers(opts)
        for step in range(STEPS):
            fake_step(model, sharded, step)
        states = sharded.state_dicts()
        torch.save({"numel": state_numel(sharded),
                    "matrices": sum(len(g["params"]) for g in sharded.local[1].param_groups)}, f"{tmp}/rank{rank}.pt")
        if rank == 0:
            save_checkpoint(f"{tmp}/sharded", STEPS, model, states, {}, {}, keep=1)
        # phase B: resume one process's checkpoint (today's unsharded state.pt) on 2 ranks, 3 more steps
        model, opts = model_and_optimizers()
        sharded = ShardedOptimizers(opts)
        load_checkpoint(f"{tmp}/single/step_{STEPS:06d}", model, sharded)
        for step in range(STEPS, 2 * STEPS):
            fake_step(model, sharded, step)
        if rank == 0:
            torch.save(model.state_dict(), f"{tmp}/resumed.pt")
    finally:
        dist.destroy_process_group()


def assert_equal_states(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        assert got["state"][i].keys() == entry.keys()
        for name, v in entry.items():
            assert torch.equal(got["state"][i][name].cpu(), v.cpu()), (i, name)
    assert got["param_groups"] == want["param_groups"]


def test_two_sharded_ranks_equal_one_process_bit_for_bit_and_resume_across_world_sizes(tmp_path):
    # the reference: one process, 2 x 3 steps uninterrupted, and its checkpoint after 3
    model, opts = model_and_optimizers()
    for step in range(STEPS):
        fake_step(model, opts, step)
    save_checkpoint(tmp_path / "single", STEPS, model, opts, {}, {}, keep=1)
    after_a = {k: v.clone() for k, v in model.state_dict().items()}
    want_a = copy.deepcopy([opt.state_dict() for opt in opts])  # state_dict() holds the live tensors
    for step in range(STEPS, 2 * STEPS):
        fake_step(model, opts, step)
    want_b = model.state_dict()

    # fork, not spawn: the children need not import torch and the project again (seconds on a busy box)
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")

    # 2 ranks == 1 process: the weights, and the gathered optimizer state, bit for bit
    ckpt = tmp_path / f"sharded/step_{STEPS:06d}"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    for got, want in zip(state["optimizers"], want_a):
        assert_equal_states(got, want)
    model, opts = model_and_optimizers()
    load_checkpoint(ckpt, model, opts)  # world size 2 -> 1: one process reads the sharded run's checkpoint
    for k, v in after_a.items():
        assert torch.equal(model.state_dict()[k], v), k
    for step in range(STEPS, 2 * STEPS):
        fake_step(model, opts, step)
    for k, v in want_b.items():
        assert torch.equal(model.state_dict()[k], v), f"2 -> 1 resume: {k}"
    # world size 1 -> 2: the unsharded checkpoint resumed on 2 ranks
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in want_b.items():
        assert torch.equal(resumed[k], v), f"1 -> 2 resume: {k}"
    # each rank kept about half the state and orthogonalised half the matrices
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    total = sum(r["numel"] for r in ranks)
    assert total == sum(v.numel() for sd in want_a for st in sd["state"].values() for v in st.values() if v.ndim)
    assert all(abs(r["numel"] / total - 0.5) < 0.05 for r in ranks), ranks
    assert [r["matrices"] for r in ranks] == [3, 3]  # 1 layer x 6 matrices


def test_owners_are_balanced_and_deterministic_at_d20_on_8_ranks():
    with torch.device("meta"):
        model = build_model(config_for_depth(20, 65536, 2048), "meta")
    opts = build_optimizers(model, 0.02, 0.2, 0.004)
    world = 8
    pieces = assign(opts, world)
    assert pieces == assign(opts, world)  # from the shapes alone: every rank draws the same table
    params = [[p for g in opt.param_groups for p in g["params"]] for opt in opts]
    load = [0] * world
    for pc in pieces:
        p = params[pc.opt][pc.index]
        load[pc.owner] += (pc.hi - pc.lo) * (p.numel() // max(p.shape[0], 1)) * (1 if isinstance(opts[pc.opt], Muon) else 2)
    total = sum(p.numel() * (1 if isinstance(opt, Muon) else 2) for opt, ps in zip(opts, params) for p in ps)
    assert sum(load) == total and max(load) <= 1.02 * total / world, [f / total for f in load]
    # every parameter is covered once: AdamW's by 8 row ranges, Muon's whole
    for k, ps in enumerate(params):
        for i, p in enumerate(ps):
            rows = sorted((pc.lo, pc.hi) for pc in pieces if pc.opt == k and pc.index == i)
            assert rows[0][0] == 0 and rows[-1][1] == p.shape[0] and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            assert len(rows) == (1 if isinstance(opts[k], Muon) else world)
    # Muon: each rank gets 1/8 of each stack it orthogonalises in one batched call (a tall matrix goes
    # with its transpose's shape), so Newton-Schulz still batches per shape
    stack = lambda p: (min(p.shape), max(p.shape))  # noqa: E731
    for key in {stack(p) for p in params[1]}:
        counts = [sum(1 for pc in pieces if pc.opt == 1 and pc.owner == r and stack(params[1][pc.index]) == key)
                  for r in range(world)]
        assert max(counts) - min(counts) <= 1, (shape, counts)


@pytest.mark.cluster  # two 2-rank torchrun runs: make test-slurm
def test_torchrun_two_ranks_sharded_equal_unsharded_bit_for_bit(template, tmp_path):
    runs = {}
    for shard in (True, False):
        root = clone(template, tmp_path / f"shard-{shard}")
        write_params(root, num_iterations=10, save_every=5, eval_every=5, sample_every=0, shard_optimizer=shard)
        run_train(root, nproc=2, NANOFORGE_TRACKING="off")
        runs[shard] = root
    steps = {k: read_csv(r / "artifacts/train/steps.csv") for k, r in runs.items()}
    assert len(steps[True]) == 10 and columns(steps[True], EXACT) == columns(steps[False], EXACT)
    got, want = (load_file(str(r / "artifacts/model/model.safetensors")) for r in (runs[True], runs[False]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the sharded run's checkpoint is the unsharded one's: one process's format, gathered to rank 0
    a, b = (torch.load(r / "artifacts/checkpoints/step_000005/state.pt", weights_only=True) for r in (runs[True], runs[False]))
    for got_sd, want_sd in zip(a["optimizers"], b["optimizers"]):
        assert_equal_states(got_sd, want_sd)
