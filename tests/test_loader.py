"""The training loader: BOS per document, one global stream, world-size invariance, exact resume, epochs."""

import numpy as np
import pytest
import torch

from nanoforge.tokenizer.bpe import train_bpe
from nanoforge.training.loader import TokenStream, TrainLoader, batch_geometry
from nanoforge.data.shards import iter_documents, train_shard_paths
from tests.datagen import make_documents, make_fineweb

T = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    make_fineweb(root, train=[0, 1], val=1822, docs_per_shard=60, row_group_size=16)
    tokenizer = train_bpe(make_documents(300, seed=5), 300)
    return train_shard_paths(directory=root), tokenizer


def steps(loader, n):
    """n steps of (x, y) per micro-batch, and the state at the start of each step."""
    out = []
    for _ in range(n):
        micro = [next(loader) for _ in range(loader.accum)]
        out.append(([(x.clone(), y.clone()) for x, y, _ in micro], micro[0][2]))
    loader.close()
    return out


def global_rows(per_rank: list) -> list[torch.Tensor]:
    """Stitch the ranks' micro-batches of each step back into the global (rows, T+1) batch."""
    result = []
    for step in zip(*per_rank):
        rows = [torch.cat([x, y[:, -1:].to(x.dtype)], dim=1) for micro, _ in step for x, y in micro]
        result.append(torch.cat(rows))
    return result


def test_stream_is_bos_plus_documents_in_order(data):
    paths, tok = data
    stream = TokenStream(paths, tok, T)
    rows = []
    for _ in range(40):
        row = np.empty(T + 1, dtype=np.int32)
        stream.next_row(row)
        rows.append(row)
    # consecutive rows overlap by one token: the last of a row is the first of the next
    assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:]))
    flat = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
    expected = []
    for text in iter_documents(paths):
        expected += tok.encode(text, prepend=tok.bos_id)
        if len(expected) > len(flat):
            break
    assert flat.tolist() == expected[: len(flat)]
    assert flat[0] == tok.bos_id and (flat == tok.bos_id).sum() > 3


def test_global_batches_do_not_depend_on_world_size_or_device_batch(data):
    paths, tok = data
    total = 8 * T  # 8 rows per step
    one = [steps(TrainLoader(paths, tok, T, 4, total, rank=0, world_size=1), 6)]  # 1 process, 2 micro-steps
    two = [steps(TrainLoader(paths, tok, T, 4, total, rank=r, world_size=2), 6) for r in range(2)]  # 2 ranks x 1
    small = [steps(TrainLoader(paths, tok, T, 2, total, rank=0, world_size=1), 6)]  # 1 process, 4 micro-steps
    four = [steps(TrainLoader(paths, tok, T, 1, total, rank=r, world_size=4), 6) for r in range(4)]  # 4 ranks x 2
    reference = global_rows(one)
    for other in (two, small, four):
        for a, b in zip(reference, global_rows(other)):
            assert torch.equal(a, b)
    # the step states agree too, so any of them can resume the others
    assert [s for _, s in one[0]] == [s for _, s in two[1]] == [s for _, s in four[3]]
    # x/y are shifted by one; inputs int32, targets int64 (cross-entropy's index type)
    (x, y), _ = one[0][0][0][0], None
    assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == (4, T)
    assert torch.equal(x[:, 1:].long(), y[:, :-1])


def test_resume_from_a_step_state_is_exact(data):
    paths, tok = data
    total = 4 * T
    full = steps(TrainLoader(paths, tok, T, 2, total), 30)
    state_at_17 = full[17][1]
    resumed = steps(TrainLoader(paths, tok, T, 2, total, state=state_at_17), 13)
    for (a, _), (b, _) in zip(full[17:], resumed):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the position is inside a document, not only at document boundaries
    assert any(s["offset"] > 0 for _, s in full)


def test_multiple_epochs(data):
    paths, tok = data
    stream = TokenStream(paths, tok, T, seed=3)
    epochs = set()
    for _ in range(2000):  # ~64k tokens, several passes over the ~10k-token data set
        stream.next_row(None)
        epochs.add(stream.state()["epoch"])
    assert {0, 1, 2} <= epochs
    # later epochs visit the row groups in a seeded order: same seed, same order; other seed, another
    assert stream._epoch_order(1) == TokenStream(paths, tok, T, seed=3)._epoch_order(1)
    assert stream._epoch_order(1) != TokenStream(paths, tok, T, seed=4)._epoch_order(1)
    assert sorted(stream._epoch_order(1)) == list(range(len(stream.groups)))


def test_bad_positions_and_batches_are_refused(data):
    paths, tok = data
    with pytest.raises(ValueError, match="points past the .* row groups"):
        TokenStream(paths, tok, T, state={"epoch": 0, "index": 999, "doc": 0, "offset": 0})
    with pytest.raises(ValueError, match="'offset' must be a non-negative int"):
        TokenStream(paths, tok, T, state={"epoch": 0, "index": 0, "doc": 0, "offset": -1})
    with pytest.raises(ValueError, match=r"total_batch_size=1000 .*device_batch_size \(4\) x train.max_seq_len \(32\) "
                                         r"x world size \(2\) = 256 tokens per micro-step; nearest valid total_batch_size: 768 or 1024"):
        batch_geometry(1000, 4, 32, 2)
    assert batch_geometry(1024, 4, 32, 2) == 4


def test_loader_errors_reach_the_training_loop(data, tmp_path):
    paths, tok = data
    broken = tmp_path / "shard_00000.parquet"
    broken.write_bytes(paths[0].read_bytes())
    loader = TrainLoader([broken], tok, T, 2, 4 * T)
    broken.write_bytes(b"not parquet any more")  # the reader thread fails on its next row group
    with pytest.raises(Exception):
        for _ in range(10_000):
            next(loader)
    loader.close()


def test_tokenizer_threads_default_to_one_on_cpu_and_never_exceed_the_usable_cpus(data):
    from nanoforge.cpus import usable_cpus

    paths, tok = data
    loader = TrainLoader(paths, tok, T, 2, 4 * T)
    assert loader.stream.threads == 1  # was 4: a pool beside the compute threads only preempted them
    loader.close()
    assert TokenStream(paths, tok, T, threads=64).threads == usable_cpus()  # a cgroup quota included


# ---------------------------------------------------------------------------
# train.loader: bestfit (nanochat HEAD's BOS-aligned best-fit packing)

def nanochat_bestfit_rows(docs, T: int, buffer_docs: int, rows: int) -> list[list[int]]:
    """nanochat HEAD's packing loop (dataloader.py, tokenizing_distributed_data_loader_with_state_bos_bestfit),
    as written there (a linear scan), with the buffer topped up one document at a time."""
    docs = iter(docs)
    buffer, out = [], []
    for _ in range(rows):
        row, pos = [], 0
        while pos < T + 1:
            while len(buffer) < buffer_docs:
                buffer.append(next(docs))
            remaining = T + 1 - pos
            best_idx, best_len = -1, 0
            for i, doc in enumerate(buffer):
                if len(doc) <= remaining and len(doc) > best_len:
                    best_idx, best_len = i, len(doc)
            if best_idx >= 0:
                doc = buffer.pop(best_idx)
                row += doc
                pos += len(doc)
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row += buffer.pop(shortest)[:remaining]
                pos += remaining
        out.append(row)
    return out


def test_bestfit_packs_as_nanochat_does(data):
    from nanoforge.training.loader import BestFitStream

    paths, tok = data
    docs = [tok.encode(text, prepend=tok.bos_id) for text in iter_documents(paths)]
    stream = BestFitStream(paths, tok, T, buffer_docs=8)
    rows = []
    for _ in range(40):
        row = np.empty(T + 1, dtype=np.int32)
        stream.next_row(row)
        rows.append(row.tolist())
    assert rows == nanochat_bestfit_rows(docs, T, 8, 40)
    assert all(r[0] == tok.bos_id for r in rows)  # every row starts at a document
    assert stream.state()["epoch"] == 0 and 0 < len(stream.state()["buffer"]) <= 8  # topped up before each choice


def test_bestfit_batches_do_not_depend_on_world_size_and_resume_exactly(data):
    paths, tok = data
    total = 8 * T
    kw = dict(kind="bestfit", buffer_docs=16)
    one = [steps(TrainLoader(paths, tok, T, 4, total, **kw), 25)]  # 1 process, 2 micro-steps; several epochs
    two = [steps(TrainLoader(paths, tok, T, 2, total, rank=r, world_size=2, **kw), 25) for r in range(2)]  # 2 x 2
    for a, b in zip(global_rows(one), global_rows(two)):
        assert torch.equal(a, b)
        assert (a[:, 0] == tok.bos_id).all()
    assert [s for _, s in one[0]] == [s for _, s in two[1]]
    assert {s["epoch"] for _, s in one[0]} >= {0, 1}  # the buffer spans an epoch boundary somewhere
    state_at = one[0][17][1]
    resumed = steps(TrainLoader(paths, tok, T, 2, total, state=state_at, rank=1, world_size=2, **kw), 8)
    for a, b in zip(global_rows(one)[17:], global_rows([two[0][17:], resumed])):
        assert torch.equal(a, b)


def test_a_position_of_the_other_loader_is_refused(data):
    from nanoforge.training.loader import BestFitStream, start_state

    paths, tok = data
    with pytest.raises(ValueError, match=r"not a best-fit one \(train.loader: bestfit\)"):
        BestFitStream(paths, tok, T, state=start_state())
    with pytest.raises(ValueError, match="is a best-fit one .* but train.loader is stream"):
        TokenStream(paths, tok, T, state=start_state("bestfit"))
    with pytest.raises(ValueError, match=r"buffer entry \[0, 0, 999\]: that row group has 16 documents"):
        BestFitStream(paths, tok, T, state={**start_state("bestfit"), "buffer": [[0, 0, 999]]})
    with pytest.raises(ValueError, match="train.loader='packed': expected one of stream, bestfit"):
        TrainLoader(paths, tok, T, 2, 4 * T, kind="packed")


def test_the_loader_is_a_recipe_option_and_resume_never_crosses_loaders():
    from nanoforge.config import TrainConfig
    from nanoforge.training.checkpoint import compat_diff
    from nanoforge.training.plan import LEGACY_COMPAT, MATH_KEYS

    assert TrainConfig().option("loader") == "stream" and TrainConfig(recipe="2026").option("loader") == "bestfit"
    assert TrainConfig(recipe="2026", loader="stream").option("loader") == "stream"
    assert {"loader_buffer_docs", "fp8"} <= set(MATH_KEYS)  # in the compat key: a change is a new run
    new = {**LEGACY_COMPAT, "train.loader": "bestfit"}
    assert compat_diff(LEGACY_COMPAT, new) == ["train.loader: 'stream' -> 'bestfit'"]
