"""Bits per byte against a brute-force computation, the fixed evaluation rows, and sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoforge.evaluation.bpb import evaluate_bpb, load_rows, rank_batches, shard_rows
from nanoforge.runtime import Runtime
from nanoforge.model.sampling import generate
from tests.datagen import make_documents, write_shard
from tests.test_core import CPU, TableLM, byte_tokenizer, prefer, table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bpe():
    from nanoforge.tokenizer.bpe import train_bpe

    # small vocabulary: multi-byte characters (accents, CJK, emoji) stay split across tokens
    return train_bpe(make_documents(300, seed=11), vocab_size=300)


def brute_force_bpb(model, rows: torch.Tensor, tokenizer) -> float:
    """Token by token in float64: nats over targets that are text, bytes from each token's bytes."""
    nats, nbytes = 0.0, 0
    specials = set(tokenizer.special_tokens.values())
    for row in rows.long():
        logits = model(row[None, :-1])[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t, target in enumerate(row[1:].tolist()):
            if target in specials:
                continue
            nats -= logp[t, target].item()
            nbytes += len(tokenizer.id_to_token(target))
    return nats / (math.log(2) * nbytes)


def test_rows_are_one_stream_overlapping_by_one_token():
    tok = byte_tokenizer()
    texts = ["abcdef", "ghij", "klmnopqrstu"]
    stream = [t for text in texts for t in tok.encode(text, prepend=tok.bos_id)]  # 24 tokens
    rows = load_rows(texts, tok, seq_len=5, num_tokens=20)
    assert rows.shape == (4, 6) and rows.dtype == torch.int32
    for i in range(4):
        assert rows[i].tolist() == stream[i * 5: i * 5 + 6]
    assert load_rows(texts, tok, 5, 1000).shape == (4, 6)  # short source: the rows it can fill
    assert load_rows(texts, tok, 5, 3).shape == (1, 6)  # a budget under one row still gives one
    with pytest.raises(ValueError, match="fewer than one row"):
        load_rows(["ab"], tok, 5, 100)


def test_rows_from_shards_read_from_the_start(tmp_path, bpe):
    docs = make_documents(100, seed=4)
    a = write_shard(tmp_path / "a.parquet", docs[:60], row_group_size=16)
    b = write_shard(tmp_path / "b.parquet", docs[60:], row_group_size=16)
    assert torch.equal(shard_rows([a, b], bpe, 32, 4000), load_rows(docs, bpe, 32, 4000))
    assert torch.equal(shard_rows([a, b], bpe, 32, 4000), shard_rows([a, b], bpe, 32, 4000))


def test_rank_batches_partition_the_rows():
    rows = torch.arange(10 * 5, dtype=torch.int32).view(10, 5)
    seen = []
    for rank in range(3):
        rt = Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=3)
        for x, y in rank_batches(rows, 2, rt):
            assert x.shape[1] == 4 and torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long
            seen += [int(r) // 5 for r in x[:, 0]]
    assert sorted(seen) == list(range(10))


def test_bpb_matches_brute_force_with_split_characters_and_specials(bpe):
    docs = make_documents(40, seed=7)
    rows = load_rows(docs, bpe, seq_len=48, num_tokens=1500)
    targets = rows[:, 1:].flatten().tolist()
    # the case that matters: tokens holding part of a UTF-8 character, and BOS targets (0 bytes)
    partial = [t for t in set(targets) if t != bpe.bos_id and _not_utf8(bpe.id_to_token(t))]
    assert partial, "the test text must split some multi-byte characters"
    assert bpe.bos_id in targets and bpe.token_bytes[bpe.bos_id] == 0
    torch.manual_seed(1)
    model = TableLM(torch.randn(bpe.vocab_size, bpe.vocab_size) * 3)
    got = evaluate_bpb(model, rank_batches(rows, 4, CPU), bpe.token_bytes, CPU)
    assert got == pytest.approx(brute_force_bpb(model, rows, bpe), rel=1e-6)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_counted_bytes_are_exactly_the_texts_utf8_bytes(bpe):
    docs = make_documents(12, seed=9)
    # rows of one target each and a budget larger than the text: every token after the first is a target
    rows = load_rows(docs, bpe, seq_len=1, num_tokens=10**6)
    stream = [t for ids in bpe.encode(docs, prepend=bpe.bos_id) for t in ids]
    covered = rows.size(0) + 1
    assert covered == len(stream)
    # a uniform model: loss ln(V) per target, so BPB = ln(V) * targets_with_bytes / (ln 2 * bytes)
    model = TableLM(torch.zeros(bpe.vocab_size, bpe.vocab_size))
    bpb = evaluate_bpb(model, rank_batches(rows, 64, CPU), bpe.token_bytes, CPU)
    counted = [t for t in stream[1:covered] if t != bpe.bos_id]
    text_bytes = sum(len(bpe.id_to_token(t)) for t in counted)
    assert text_bytes == sum(len(d.encode("utf-8")) for d in docs)
    assert bpb == pytest.approx(len(counted) * math.log(bpe.vocab_size) / (math.log(2) * text_bytes), rel=1e-6)


def test_ignored_targets_count_neither_nats_nor_bytes(bpe):
    rows = load_rows(make_documents(20, seed=2), bpe, seq_len=32, num_tokens=600)
    torch.manual_seed(2)
    model = TableLM(torch.randn(bpe.vocab_size, bpe.vocab_size))
    x, y = rows[:, :-1].long(), rows[:, 1:].long().clone()
    y[:, ::3] = -1
    got = evaluate_bpb(model, [(x, y)], bpe.token_bytes, CPU)
    logp = torch.log_softmax(model(x).double(), -1)
    keep = (y >= 0) & (torch.as_tensor(bpe.token_bytes)[y.clamp(min=0)] > 0)
    nats = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].sum().item()
    nbytes = torch.as_tensor(bpe.token_bytes)[y.clamp(min=0)][keep].sum().item()
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def test_bpb_of_the_real_gpt_matches_its_logits(bpe):
    from nanoforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=bpe.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)  # zero-init head gives a uniform model; make it opinionated
    rows = load_rows(make_documents(30, seed=3), bpe, seq_len=32, num_tokens=800)
    got = evaluate_bpb(model, rank_batches(rows, 5, CPU), bpe.token_bytes, CPU)
    assert got == pytest.approx(brute_force_bpb(model, rows, bpe), rel=1e-5)
    uniform = brute_force_bpb(TableLM(torch.zeros(bpe.vocab_size, bpe.vocab_size)), rows, bpe)
    assert got != pytest.approx(uniform, rel=1e-3)  # the check above compared real predictions


def _opinionated_gpt(vocab: int, padded: bool = True):
    from nanoforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    # vocab not a multiple of 64: the padding crop runs inside every chunk too
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    return model


def _head_rows(model) -> list[int]:
    """Positions per LM-head call, recorded by a forward hook (what sizes the fp32 logits)."""
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.numel() // out.size(-1)))
    return seen


@pytest.mark.parametrize("rows", [1, 7, 64, 10_000])
def test_chunked_eval_loss_equals_the_unchunked_training_loss(rows):
    # issue 12: eval materialised B x T x vocab fp32 logits several times over (50 GB at d20)
    model = _opinionated_gpt(300)
    x = torch.randint(0, 300, (5, 32))
    y = torch.randint(0, 300, (5, 32))
    y[0, :3] = -1  # ignored targets
    seen = _head_rows(model)
    with torch.enable_grad():  # the training path: one head call over every position
        full = model(x, y, loss_reduction="none").detach()
        full_mean = model(x, y).detach()
    seen.clear()
    with torch.no_grad():
        chunked = model(x, y, loss_reduction="none", loss_chunk_rows=rows)
        chunked_mean = model(x, y, loss_chunk_rows=rows)
        chunked_sum = model(x, y, loss_reduction="sum", loss_chunk_rows=rows)
    assert max(seen) <= rows and sum(seen) == 3 * 5 * 32  # never more than `rows` positions of logits at once
    assert chunked.shape == (5, 32) and torch.all(chunked[0, :3] == 0)
    assert torch.allclose(chunked, full, atol=1e-6, rtol=0)
    assert abs(chunked_mean.item() - full_mean.item()) < 1e-6
    assert abs(chunked_sum.item() - full[y >= 0].sum().item()) < 1e-4 * full.numel()


def test_chunked_training_loss_and_gradients_equal_the_plain_path():
    # what CUDA training runs (chunks under activation checkpointing), forced on the CPU
    model = _opinionated_gpt(300)
    x = torch.randint(0, 300, (4, 32))
    y = torch.randint(0, 300, (4, 32))
    y[1, 5:9] = -1
    model(x, y).backward()  # the CPU default: unchunked
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = _head_rows(model)
    loss = model(x, y, loss_chunk_rows=24)
    loss.backward()
    assert max(seen) == 24 and len(seen) == 2 * 6  # 6 chunks, each recomputed once in backward
    assert abs(loss.item() - F.cross_entropy(model(x).view(-1, 300), y.view(-1), ignore_index=-1).item()) < 1e-6
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-6, rtol=1e-5), name


def test_eval_chunks_follow_the_byte_budget(bpe, monkeypatch):
    import nanoforge.model.gpt as gpt

    model = _opinionated_gpt(bpe.vocab_size)
    rows = load_rows(make_documents(30, seed=3), bpe, seq_len=32, num_tokens=800)
    reference = evaluate_bpb(model, rank_batches(rows, 5, CPU), bpe.token_bytes, CPU)
    monkeypatch.setattr(gpt, "LOSS_CHUNK_BYTES", 4 * bpe.vocab_size * 40)  # 40 positions of fp32 logits
    seen = _head_rows(model)
    got = evaluate_bpb(model, rank_batches(rows, 5, CPU), bpe.token_bytes, CPU)
    assert max(seen) == 40 and got == pytest.approx(reference, abs=1e-6)
    assert got == pytest.approx(brute_force_bpb(model, rows, bpe), rel=1e-5)


def test_no_grad_logits_are_bit_identical_to_the_grad_path():
    model = _opinionated_gpt(300)
    x = torch.randint(0, 300, (3, 32))
    with torch.enable_grad():
        ref = model(x).detach()
    with torch.no_grad():  # the in-place softcap
        got = model(x)
    assert torch.equal(got, ref) and got.shape == (3, 32, 300)


def test_zero_bytes_is_an_error():
    tok = byte_tokenizer()
    x = torch.full((1, 4), tok.bos_id)
    with pytest.raises(ValueError, match="zero bytes"):
        evaluate_bpb(TableLM(table()), [(x, x)], tok.token_bytes, CPU)


# ---------------------------------------------------------------------------
# sampling

def test_greedy_follows_the_model_and_stops_at_bos():
    tok = byte_tokenizer()
    t = table()
    for a, b in zip("help", "elp "):
        prefer(t, a, b, 10.0)
    t[ord(" "), tok.bos_id] = 10.0  # after the space a new document would start
    prefer(t, "x", "y", 10.0)
    prefer(t, "y", "x", 10.0)
    out = generate(TableLM(t), tok, ["h", "say h", "x"], max_tokens=6)
    assert out == ["elp ", "elp ", "yxyxyx"]


def test_generation_runs_past_the_context_by_cropping():
    tok = byte_tokenizer()
    t = table()
    prefer(t, "x", "y", 10.0)
    prefer(t, "y", "x", 10.0)
    model = TableLM(t, sequence_len=4)  # raises on more than 4 tokens
    assert generate(model, tok, ["x"], max_tokens=9) == ["yxyxyxyxy"]


def test_temperature_sampling_is_seeded():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = TableLM(torch.randn(265, 265))
    a = generate(model, tok, ["", "", "a"], 12, temperature=1.0, seed=1)
    assert a == generate(model, tok, ["", "", "a"], 12, temperature=1.0, seed=1)
    assert a != generate(model, tok, ["", "", "a"], 12, temperature=1.0, seed=2)
    assert a[0] != a[1]  # two unconditioned samples in one batch differ
    assert generate(model, tok, ["a"], 5, seed=1) == generate(model, tok, ["a"], 5, seed=2)  # greedy ignores it


def test_real_gpt_generates_beyond_its_context(bpe):
    from nanoforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=bpe.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    model.init_weights()
    out = generate(model, bpe, ["The cat sees", ""], max_tokens=20, temperature=1.0, seed=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
