"""The tokenizer API (stages/bpe.py): real rustbpe training, real tiktoken encoding, the files on disk."""

from __future__ import annotations

import base64
import hashlib
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nanoforge.tokenizer.bpe import (
    META_FILE, MIN_VOCAB_SIZE, RANKS_FILE, SPECIAL_TOKENS, TokenizerError, load_tokenizer, train_bpe,
)
from nanoforge.tokenizer.texts import TEXTS
from tests.datagen import make_documents


def cjk_documents(n: int, seed: int = 0) -> list[str]:
    """Words of U+4E00..U+4E3F: every one is E4 B8 xx in UTF-8, so BPE merges E4 B8 into a token
    that is not valid UTF-8 on its own."""
    rng = random.Random(seed)
    return [
        " ".join("".join(chr(0x4E00 + rng.randrange(64)) for _ in range(rng.randint(2, 4))) for _ in range(30))
        for _ in range(n)
    ]


def training_docs() -> list[str]:
    return make_documents(600, seed=0) + list(TEXTS.values()) + cjk_documents(100)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(training_docs(), 2048)


@pytest.fixture
def saved(tok, tmp_path):
    tok.save(tmp_path / "tok", {"note": "test"})
    return tmp_path / "tok"


# --- training and storage

def test_training_is_deterministic_to_the_byte(tmp_path):
    docs = training_docs()
    for name in ("a", "b"):
        train_bpe(iter(docs), 2048).save(tmp_path / name, {"docs": len(docs)})
    for f in (RANKS_FILE, META_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_vocab_layout_and_specials_take_the_last_ids(tok):
    n_ranks = len(tok.mergeable_ranks)
    assert tok.vocab_size == 2048 == n_ranks + len(SPECIAL_TOKENS)
    assert sorted(tok.mergeable_ranks.values()) == list(range(n_ranks))
    assert all(bytes([b]) in tok.mergeable_ranks for b in range(256))
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n_ranks, tok.vocab_size))
    assert tok.bos_id == n_ranks == tok.encode_special("<|bos|>")
    assert tok.id_to_token(tok.bos_id) == b"<|bos|>"
    # special-token strings inside text are text, never the special id
    assert tok.bos_id not in tok.encode("<|bos|> hello <|user_start|>")
    assert tok.decode(tok.encode("<|bos|>")) == "<|bos|>"
    with pytest.raises(TokenizerError, match="unknown special token '<|nope|>'"):
        tok.encode_special("<|nope|>")


def test_vocab_too_small_is_refused_before_training():
    with pytest.raises(TokenizerError, match=rf"vocab_size 260 is too small.*at least {MIN_VOCAB_SIZE}"):
        train_bpe(iter(["never read"]), 260)


def test_text_that_runs_out_of_pairs_gives_a_smaller_vocab():
    tok = train_bpe(["ab ab ab"] * 10, 1000)
    assert 256 + len(SPECIAL_TOKENS) <= tok.vocab_size < 1000
    assert tok.decode(tok.encode("ab abc")) == "ab abc"


def test_saved_files_round_trip_and_tiktoken_reads_the_ranks(tok, saved):
    from tiktoken.load import load_tiktoken_bpe

    loaded = load_tokenizer(saved)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.token_bytes, tok.token_bytes)
    assert loaded.meta["train"] == {"note": "test"}
    assert load_tiktoken_bpe(str(saved / RANKS_FILE)) == tok.mergeable_ranks  # the real .tiktoken format
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["ranks_sha256"] == hashlib.sha256((saved / RANKS_FILE).read_bytes()).hexdigest()
    assert not any(p.name.endswith(".tmp") for p in saved.iterdir())  # no leftovers of the atomic writes


# --- token_bytes

def test_token_bytes_counts_bytes_not_decoded_characters(tok):
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (tok.vocab_size,)
    assert all(tok.token_bytes[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    # tokens that are not valid UTF-8 alone: a merged lead pair (E4 B8) and the lone bytes 0x80..0xFF
    partial = [i for i in range(tok.vocab_size - len(SPECIAL_TOKENS)) if not _valid_utf8(tok.id_to_token(i))]
    assert tok.encode("一")[0] != tok.mergeable_ranks[b"\xe4"]  # E4 B8 was merged...
    assert b"\xe4\xb8" in tok.mergeable_ranks  # ...into a token that splits every char of the CJK words
    for i in partial:
        raw = tok.id_to_token(i)
        assert tok.token_bytes[i] == len(raw)
        assert len(tok.decode([i]).encode("utf-8")) != len(raw)  # the wrong way: U+FFFD counts 3 bytes
    # a character the training never saw (U+4E40 = E4 B9 80) encodes as tokens that split it
    text = "上下 \u4e40丁 ok"
    ids = tok.encode(text)
    assert any(not _valid_utf8(tok.id_to_token(i)) for i in ids)
    right = int(tok.token_bytes[ids].sum())
    wrong = sum(len(tok.decode([i]).encode("utf-8")) for i in ids)
    assert right == len(text.encode("utf-8")) != wrong


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- encoding

def test_batch_encoding_matches_one_by_one(tok):
    texts = make_documents(50, seed=7) + list(TEXTS.values()) + ["", " ", "\x00"]
    single = [tok.encode(t) for t in texts]
    for threads in (1, 2, 8):
        assert tok.encode(texts, num_threads=threads) == single
        assert tok.encode(tuple(texts), num_threads=threads) == single  # any sequence
    with_bos = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"), num_threads=2)
    assert with_bos == [[tok.bos_id] + ids + [tok.encode_special("<|assistant_end|>")] for ids in single]
    assert tok.encode("hi", prepend=tok.bos_id)[0] == tok.bos_id
    assert tok.encode([]) == []


def test_bad_encode_arguments_name_the_problem(tok):
    with pytest.raises(TypeError, match="expected str or a list of str, got int"):
        tok.encode(5)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str, got bytes"):
        tok.encode(["ok", b"raw"], num_threads=2)
    with pytest.raises(ValueError, match=r"token id 99999 is outside the vocabulary \(0\.\.2047\)"):
        tok.encode("x", prepend=99999)


def test_lone_surrogates_are_rejected_clearly(tok):
    with pytest.raises(ValueError, match=r"text contains a lone surrogate '\\ud83d' at index 3"):
        tok.encode("abc\ud83d")
    with pytest.raises(ValueError, match=r"texts\[2\] contains a lone surrogate '\\udc80' at index 0"):
        tok.encode(["fine", "also fine", "\udc80 bad"], num_threads=2)
    assert tok.encode("\U0001F642") == tok.encode("\U0001F642")  # a proper pair (one code point) is fine


TRICKY = st.sampled_from([
    "🙂", "👩‍👩‍👧‍👦", "🇫🇷", "東京", "汉字", "ｶﾀｶﾅ", "é", "e\u0301", "a\u0300\u0316\u0317", "\u200d", "\ufeff",
    "\x00", "\t", "\r\n", "\n\n\n", " ", "\u00a0", "\u3000", "0", "12", "٣", "Ⅻ", "'s", "'LL", "<|bos|>", "\U0010ffff",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(TRICKY, st.text(max_size=20)), max_size=30).map("".join))
@example(" " * 5000)
@example("\n" * 3000 + "\t" * 3000)
@example("9" * 10001)
@example("1 2 3 " * 1000 + "3.14159265358979323846264338327950288419716939937510")
@example("\x00" * 100)
@example("e" + "\u0301" * 500)
@example("🙂" * 1000)
def test_any_unicode_string_round_trips_exactly(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.encode([text, text], num_threads=2) == [ids, ids]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=30), st.characters(categories=["Cs"]), st.text(max_size=30))
def test_any_lone_surrogate_is_rejected(tok, before, surrogate, after):
    with pytest.raises(ValueError, match=f"lone surrogate .* at index {len(before)}"):
        tok.encode(before + surrogate + after)


# --- the loader refuses broken directories

def test_loader_rejects_a_tampered_rank_file(saved):
    path = saved / RANKS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    token, rank = lines[300].split()
    lines[300] = base64.b64encode(b"evil") + b" " + rank + b"\n"  # same rank, another token
    path.write_bytes(b"".join(lines))
    with pytest.raises(TokenizerError, match=r"tokenizer\.tiktoken: its sha256 does not match tokenizer\.json.*dvc checkout"):
        load_tokenizer(saved)


def test_loader_rejects_a_truncated_rank_file(saved):
    path = saved / RANKS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match="truncated or changed"):
        load_tokenizer(saved)


def _rewrite(saved, ranks_bytes: bytes, **meta_changes) -> None:
    # edit the ranks *and* fix the hash: what only a deliberate edit could produce
    (saved / RANKS_FILE).write_bytes(ranks_bytes)
    meta = json.loads((saved / "pristine.json").read_text())
    meta["ranks_sha256"] = hashlib.sha256(ranks_bytes).hexdigest()
    meta.update(meta_changes)
    (saved / META_FILE).write_text(json.dumps(meta))


def test_loader_rejects_consistent_but_broken_edits(saved):
    good = (saved / RANKS_FILE).read_bytes()
    lines = good.splitlines(keepends=True)
    (saved / "pristine.json").write_bytes((saved / META_FILE).read_bytes())
    _rewrite(saved, b"".join(lines[:-1]))  # one rank fewer than vocab_size says
    with pytest.raises(TokenizerError, match=r"ranks \+ 9 specials != vocab_size 2048"):
        load_tokenizer(saved)
    _rewrite(saved, b"".join(lines[:10]) + b"not base64!! 10\n" + b"".join(lines[11:]))
    with pytest.raises(TokenizerError, match=r"tokenizer\.tiktoken:11: malformed line"):
        load_tokenizer(saved)
    _rewrite(saved, b"".join(lines[:-1]) + lines[-1].replace(b" 2038", b" 5000"))
    with pytest.raises(TokenizerError, match="contiguous ids"):
        load_tokenizer(saved)
    dup = lines[4].split()[0] + b" 5\n"  # byte 4's token again, as rank 5
    _rewrite(saved, b"".join(lines[:5]) + dup + b"".join(lines[6:]))
    with pytest.raises(TokenizerError, match="tokens repeat"):
        load_tokenizer(saved)
    _rewrite(saved, good, special_tokens={"<|bos|>": 0})
    with pytest.raises(TokenizerError, match="special tokens .* differ"):
        load_tokenizer(saved)
    _rewrite(saved, good, pattern="(unclosed")
    with pytest.raises(TokenizerError, match="tiktoken rejects it"):
        load_tokenizer(saved)


def test_loader_rejects_missing_or_foreign_files(saved, tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.tiktoken: missing; train the tokenizer first"):
        load_tokenizer(tmp_path / "nowhere")
    (saved / META_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(saved)
    (saved / META_FILE).write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(TokenizerError, match="format 'something-else/9', expected 'nanoforge-bpe/1'"):
        load_tokenizer(saved)


def test_a_pickled_copy_encodes_the_same(tok):
    import pickle

    tok.encode(["warm", "the pool"], num_threads=2)  # a live thread pool must not get in the way
    copy = pickle.loads(pickle.dumps(tok))
    text = "Pickled for a DataLoader worker: 東京 🙂 \u4e40"
    assert copy.encode([text, text], num_threads=2) == tok.encode([text, text], num_threads=2)
    assert copy.vocab_size == tok.vocab_size and (copy.token_bytes == tok.token_bytes).all()


@pytest.mark.timeout(60)
def test_batch_encoding_works_in_a_forked_child(saved):
    # Forked in a fresh interpreter: forking pytest itself (MLflow, torch and OpenMP threads
    # holding locks) can hang the child for reasons that have nothing to do with the tokenizer.
    import subprocess
    import sys

    script = f"""
import os, signal
from nanoforge.tokenizer.bpe import load_tokenizer
from tests.datagen import make_documents
tok = load_tokenizer({str(saved)!r})
texts = make_documents(20, seed=3)
expected = tok.encode(texts, num_threads=2)  # the parent's pool threads exist; a forked child has none
pid = os.fork()
if pid == 0:  # without a fresh pool this would wait forever on threads that do not exist
    signal.alarm(30)  # so a regression fails instead of leaving a process behind
    try:
        os._exit(0 if tok.encode(texts, num_threads=2) == expected else 1)
    except BaseException:
        os._exit(2)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
