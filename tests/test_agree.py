"""The replicas of a DDP run agree at every checkpoint (issue 12): the digests, the DDP wrapper, and a real
2-rank torchrun (gloo) where one rank drifts. The start-of-run agreement (params, checkpoint folder, resume)
is tested across two agents in test_multinode.py."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from nanoforge.model.gpt import GPT, GPTConfig
from nanoforge.runtime import Runtime
from nanoforge.training.agree import check_replicas, replica_digests, replica_mismatch
from nanoforge.training.checkpoint import list_checkpoints
from nanoforge.training.loop import wrap_ddp
from tests.test_train import clone, env_for, template, write_params  # noqa: F401 (template: the fixture)


def tiny() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    return model


def test_the_digests_see_one_ulp_a_swap_and_a_buffer_and_name_the_first_tensor_that_differs():
    model = tiny()
    ref = replica_digests(model)
    names = [d[0] for d in ref]
    assert "cos" in names and "sin" in names and names[0] == "transformer.wte.weight"
    assert replica_digests(model) == ref and replica_mismatch([("a", ref), ("b", ref), ("c", ref)], 5) is None
    params = dict(model.named_parameters())
    target = "transformer.h.0.attn.c_k.weight"
    with torch.no_grad():
        flat = params[target].view(-1)
        flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))  # one ULP of one element
    drifted = replica_digests(model)
    message = replica_mismatch([("node-a", ref), ("node-a", ref), ("node-b", drifted)], 5)
    assert message.startswith("the ranks' copies of the model differ at step 5: rank 2 on node-b differs from rank 0 "
                              f"on node-a: first at {target} (1 of {len(ref)} tensors differ)"), message
    assert "rank 1" not in message
    with torch.no_grad():
        flat[7] = torch.nextafter(flat[7], torch.tensor(float("-inf")))
        fc = params["transformer.h.0.mlp.c_fc.weight"].view(-1)
        fc[0], fc[2] = fc[2].clone(), fc[0].clone()  # the same values in other places (the same half of a 64-bit word)
        model.cos.view(-1)[3] += 1  # a rotary buffer: no longer broadcast by DDP, so compared here
    swapped = replica_digests(model)
    i = names.index("transformer.h.0.mlp.c_fc.weight")
    assert swapped[names.index(target)] == ref[names.index(target)]
    assert swapped[i][1] == ref[i][1] and swapped[i][2] != ref[i][2]  # the bit sum misses a swap, the sample does not
    message = replica_mismatch([("h", ref), ("h", swapped)], 10)
    assert f"rank 1 on h differs from rank 0 on h: first at {names[i]} (2 of {len(ref)} tensors differ)" in message


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield Runtime(device=torch.device("cpu"), dtype=torch.float32)
    dist.destroy_process_group()


def test_ddp_broadcasts_no_buffers_and_equal_replicas_pass(one_rank_group, tmp_path):
    # issue 12: DDP's default broadcast rank 0's rotary cos/sin to every rank before every forward
    model = tiny()
    ddp = wrap_ddp(model, torch.device("cpu"))
    assert model.cos.numel() > 0 and not ddp.will_sync_module_buffers()  # what DDP's forward asks before it broadcasts
    loss = ddp(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    loss.backward()  # a forward and backward through the wrapper work without it
    check_replicas(model, one_rank_group, 3, tmp_path)  # through the real gather: one rank agrees with itself


@pytest.mark.cluster  # two torchrun ranks for a whole run: make test-slurm, to keep make test under 10 minutes
def test_a_rank_that_drifts_stops_the_run_before_its_checkpoint(template, tmp_path):
    # issue 12: replicas stayed equal only by bitwise determinism, and only rank 0's copy was saved
    root = clone(template, tmp_path / "w")
    # unsharded: the sharded step (shard.py) broadcasts each parameter from its owner every step, which
    # would carry the injected drift to every rank (or undo it) before the check could see it
    write_params(root, num_iterations=6, save_every=3, eval_every=0, sample_every=0, shard_optimizer=False)
    launcher = [sys.executable, "-m", "nanoforge.torchrun", "--standalone", "--nproc_per_node=2", "-m", "stages.train"]
    proc = subprocess.run(launcher, cwd=root, env=env_for(root, NANOFORGE_TRACKING="off", NANOFORGE_TEST_PERTURB_RANK="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    (perturbed,) = re.findall(r"NANOFORGE_TEST_PERTURB_RANK: rank 1 perturbed ([\w.]+)", proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error")]
    assert len(lines) == 2 and lines[1].startswith("error: 2 worker(s) failed"), proc.stderr[-4000:]  # the launcher's
    line = lines[0]  # rank 0's: the other rank stops with it, quietly
    host = socket.gethostname()
    assert line.startswith(f"error: the ranks' copies of the model differ at step 3: rank 1 on {host} differs from "
                           f"rank 0 on {host}: first at {perturbed} (1 of "), line
    assert "The checkpoint of step 3 was not written" in line
    assert "step 00003/00006" in proc.stdout and "step 00004/" not in proc.stdout
    checkpoints = root / "artifacts/checkpoints"
    assert not list_checkpoints(checkpoints) and not list(checkpoints.glob(".step_*"))
    assert not (root / "artifacts/model").exists() and not (root / "artifacts/train/metrics.json").exists()
