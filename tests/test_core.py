"""CORE scoring, checked exactly: forced models whose right answers are known by construction.

The tokenizer is byte level (no merges), so a character is a token and spans can be
counted by hand. `TableLM` is a bigram model: the logits at a position are the
row of a table for the current token, so a test decides what the model prefers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoforge.evaluation import core
from nanoforge.tokenizer.bpe import Tokenizer
from nanoforge.evaluation.core import (
    BundleError, Task, centered, common_length, crop_rows, evaluate_core, evaluate_task, fewshot_indices,
    item_rows, load_bundle, prepare_items, render_prompts, score_rows,
)
from nanoforge.runtime import Runtime
from tests.datagen import make_eval_bundle

REAL_BUNDLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval_bundle"
CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})


class TableLM(nn.Module):
    """logits[b, t] = table[idx[b, t]]: a bigram model whose preferences a test writes down."""

    def __init__(self, table: torch.Tensor, sequence_len: int | None = None):
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)
        self.max_seq_len = sequence_len
        self.forwards = 0
        self.rows_seen = 0

    def forward(self, idx, targets=None, loss_reduction="mean"):
        if self.max_seq_len is not None and idx.size(1) > self.max_seq_len:
            raise ValueError(f"{idx.size(1)} tokens > context {self.max_seq_len}")
        self.forwards += 1
        self.rows_seen += idx.size(0)
        logits = self.table[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


def table(vocab: int = 265) -> torch.Tensor:
    return torch.zeros(vocab, vocab)


def prefer(t: torch.Tensor, after: str | None, token: str, score: float) -> None:
    """After character `after` (None: after every token), raise the logit of `token` by `score`."""
    if after is None:
        t[:, ord(token)] += score
    else:
        t[ord(after), ord(token)] += score


def task(kind, items, shots=0, delim=" ", baseline=0.0, label="t") -> Task:
    return Task(label, kind, Path(f"{label}.jsonl"), shots, delim, baseline, items)


# ---------------------------------------------------------------------------
# the data path: nanochat's shuffle and few-shot draws, exactly

def test_shuffle_and_cut_match_nanochat():
    assert prepare_items(list(range(10)), None) == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert prepare_items(list(range(10)), 4) == [0, 3, 7, 2]  # shuffle first, then cut


def test_fewshot_indices_are_nanochats_draws():
    assert fewshot_indices(10, 3, 4) == [2, 7, 9, 1]
    assert fewshot_indices(10, 0, 3) == [8, 2, 1]
    assert fewshot_indices(5, 2, 0) == []
    for i in range(10):
        assert i not in fewshot_indices(10, i, 9)


def test_fewer_items_than_shots_uses_what_exists(caplog):
    assert fewshot_indices(3, 1, 10) == [2, 0]
    items = [{"context": f"c{i}", "continuation": "x"} for i in range(3)]
    log = logging.getLogger("t")
    with caplog.at_level("WARNING"):
        result = evaluate_task(TableLM(table()), byte_tokenizer(), task("language_modeling", items, shots=10), CPU,
                               None, 4096, log=log)
    assert result.shots == 2 and result.items == 3
    assert "2-shot prompts instead of 10" in caplog.text


# ---------------------------------------------------------------------------
# prompts, character for character

def test_render_multiple_choice_with_shots():
    shots = [{"query": "Q1?", "choices": ["a", "b"], "gold": 1}, {"query": "Q2?", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3?", "choices": ["yes", "no"], "gold": 0}
    assert render_prompts("multiple_choice", item, "\nAnswer: ", shots) == [
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ3?\nAnswer: yes",
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ3?\nAnswer: no",
    ]


def test_render_schema_with_shots():
    shots = [{"context_options": ["A did", "B did"], "continuation": "it.", "gold": 1}]
    item = {"context_options": ["X ran", "Y ran"], "continuation": "fast.", "gold": 0}
    assert render_prompts("schema", item, " ", shots) == ["B did it.\n\nX ran fast.", "B did it.\n\nY ran fast."]


def test_render_language_modeling_trims_and_strips():
    shots = [{"context": "  Ctx one  ", "continuation": "One"}]
    item = {"context": "Ctx two \n", "continuation": "Two"}
    without, with_ = render_prompts("language_modeling", item, "\nAnswer: ", shots)
    assert with_ == "Ctx one\nAnswer: One\n\nCtx two\nAnswer: Two"
    assert without == "Ctx one\nAnswer: One\n\nCtx two\nAnswer:"  # stripped: the trailing space is not a token of its own


# ---------------------------------------------------------------------------
# spans

def test_spans_mc_prefix_schema_suffix_lm_continuation():
    tok = byte_tokenizer()
    notes = {}
    rows = item_rows("multiple_choice", ["Q: zab", "Q: zd"], tok, notes)
    assert [(s, e) for _, s, e in rows] == [(5, 7), (5, 6)]  # BOS + "Q: z" is the common prefix
    rows = item_rows("schema", ["The cat ran.", "A dog ran."], tok, notes)
    assert [(s, e) for _, s, e in rows] == [(8, 13), (6, 11)]  # " ran." (5 tokens) is the common suffix
    rows = item_rows("language_modeling", ["abc", "abc de"], tok, notes)
    assert [(s, e) for _, s, e in rows] == [(4, 7)]  # " de": the delimiter is scored with the continuation
    assert notes == {}


def test_option_that_is_a_prefix_of_another_keeps_one_token_and_says_so():
    notes = {}
    rows = item_rows("multiple_choice", ["Q: a", "Q: ab"], byte_tokenizer(), notes)
    assert [(s, e) for _, s, e in rows] == [(4, 5), (4, 6)]  # nanochat: empty span, NaN score
    assert notes == {"empty_span_kept_last_token": 1}


def test_crop_keeps_last_tokens_and_shifts_spans():
    notes = {}
    rows = crop_rows([(list(range(10)), 6, 10), (list(range(4)), 1, 4)], 5, notes)
    assert rows == [([5, 6, 7, 8, 9], 1, 5), ([0, 1, 2, 3], 1, 4)]
    assert notes == {"rows_cropped": 1}
    rows = crop_rows([(list(range(10)), 3, 10)], 5, notes)
    assert rows == [([5, 6, 7, 8, 9], 1, 5)] and notes["span_cut_by_crop"] == 1


def test_common_length():
    assert common_length([[1, 2, 3], [1, 2, 4]], "left") == 2
    assert common_length([[9, 2, 3], [1, 2, 3]], "right") == 2
    assert common_length([[1, 2], [1, 2, 3]], "left") == 2


# ---------------------------------------------------------------------------
# scoring with forced models

def test_mc_picks_lowest_mean_loss_over_the_span_only():
    # span "ab" scores (5, 0): mean beats "d" (2) but the sum does not; the shared prefix "z"
    # is hugely preferred, so scoring it would flip the answer to the shorter option
    t = table()
    prefer(t, None, "a", 5.0)
    prefer(t, None, "d", 2.0)
    prefer(t, None, "z", 20.0)
    items = [{"query": "Q:", "choices": ["zab", "zd"], "gold": 0}, {"query": "Q:", "choices": ["zd", "zab"], "gold": 1},
             {"query": "Q:", "choices": ["zd", "zab"], "gold": 0}]
    result = evaluate_task(TableLM(t), byte_tokenizer(), task("multiple_choice", items, baseline=25.0), CPU, None, 4096)
    assert (result.correct, result.items) == (2, 3)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.centered == pytest.approx((2 / 3 - 0.25) / 0.75)


def test_schema_scores_the_common_suffix_only():
    t = table()
    prefer(t, "g", " ", 10.0)  # after "dog" the shared continuation starts easily
    for ch in "The cat":  # the first context is very predictable, which must not matter
        prefer(t, None, ch, 0.0)
    prefer(t, "T", "h", 30.0)
    prefer(t, "h", "e", 30.0)
    items = [{"context_options": ["The cat", "A dog"], "continuation": "ran.", "gold": 1},
             {"context_options": ["A dog", "The cat"], "continuation": "ran.", "gold": 1}]
    result = evaluate_task(TableLM(t), byte_tokenizer(), task("schema", items), CPU, None, 4096)
    assert result.correct == 1  # the second item's gold is the cat: wrong by construction


def test_lm_is_correct_only_when_greedy_reproduces_every_token():
    t = table()
    for a, b in [("c", " "), (" ", "d"), ("d", "e")]:
        prefer(t, a, b, 10.0)
    items = [{"context": "abc", "continuation": "de"},  # c->' '->d->e: exact
             {"context": "abc  ", "continuation": "de"},  # context trimmed: same prompt, exact
             {"context": "abc", "continuation": "df"},  # d->f is not the argmax
             {"context": "xbc", "continuation": "dee"}]  # e->e is not the argmax
    result = evaluate_task(TableLM(t), byte_tokenizer(), task("language_modeling", items), CPU, None, 4096)
    assert result.correct == 2


def test_ties_go_to_the_first_option():
    items = [{"query": "Q", "choices": ["a", "b"], "gold": 0}, {"query": "Q", "choices": ["a", "b"], "gold": 1}]
    result = evaluate_task(TableLM(table()), byte_tokenizer(), task("multiple_choice", items), CPU, None, 4096)
    assert result.correct == 1


def test_crop_to_context_scores_the_end():
    t = table()
    for a, b in [("c", " "), (" ", "d"), ("d", "e")]:
        prefer(t, a, b, 10.0)
    items = [{"context": "x" * 50 + "abc", "continuation": "de"} for _ in range(2)]
    model = TableLM(t, sequence_len=8)  # raises if it sees more than 8 tokens
    result = evaluate_task(model, byte_tokenizer(), task("language_modeling", items), CPU, 8, 4096)
    assert result.correct == 2 and result.notes == {"rows_cropped": 2}


def test_centering_and_core_mean():
    assert centered(0.25, 25.0) == 0.0
    assert centered(1.0, 62.0) == pytest.approx(1.0)
    assert centered(0.224406, 20.0) == pytest.approx(0.030508, abs=1e-6)  # nanochat's GPT-2 commonsense_qa
    t = table()
    prefer(t, None, "a", 10.0)
    mc = task("multiple_choice", [{"query": "Q", "choices": ["a", "b"], "gold": g} for g in (0, 0, 0, 1)], baseline=50.0, label="mc")
    lm = task("language_modeling", [{"context": "q", "continuation": c} for c in ("b", "c")], label="lm")
    score, results = evaluate_core(TableLM(t), byte_tokenizer(), [mc, lm], CPU, None, 4096)
    assert [r.accuracy for r in results] == [0.75, 0.0]
    assert score == pytest.approx(((0.75 - 0.5) / 0.5 + 0.0) / 2)


# ---------------------------------------------------------------------------
# batching: packed rows give what one forward per item gives (nanochat's loop)

def _nanochat_reference(model, tokenizer, t: Task, max_len):
    """One forward per item, full-sequence cross-entropy, as nanochat's evaluate_example."""
    data = prepare_items(t.items, None)
    correct = 0
    for i, item in enumerate(data):
        shots = [data[j] for j in fewshot_indices(len(data), i, t.num_fewshot)]
        rows = crop_rows(item_rows(t.kind, render_prompts(t.kind, item, t.delimiter, shots), tokenizer, {}), max_len, {})
        longest = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), longest), tokenizer.bos_id)
        for b, (tokens, _, _) in enumerate(rows):
            ids[b, : len(tokens)] = torch.tensor(tokens)
        logits = model(ids)
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.roll(ids, -1, 1).reshape(-1), reduction="none").view(ids.shape)
        preds = logits.argmax(-1)
        if t.kind == "language_modeling":
            _, s, e = rows[0]
            correct += bool(torch.all(preds[0, s - 1: e - 1] == ids[0, s:e]))
        else:
            means = [losses[b, s - 1: e - 1].mean().item() for b, (_, s, e) in enumerate(rows)]
            correct += means.index(min(means)) == item["gold"]
    return correct


@pytest.fixture(scope="module")
def gpt_and_bundle(tmp_path_factory):
    from nanoforge.tokenizer.bpe import train_bpe
    from nanoforge.model.gpt import GPT, GPTConfig
    from tests.datagen import make_documents

    tok = train_bpe(make_documents(200, seed=3), vocab_size=320)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # an untrained-but-opinionated model: zero-init heads would tie everything
    model.eval()
    bundle = make_eval_bundle(tmp_path_factory.mktemp("bundle"), items_per_task=10)
    tasks, _ = load_bundle(bundle)
    return model, tok, tasks


def test_batched_scoring_equals_one_forward_per_item(gpt_and_bundle):
    model, tok, tasks = gpt_and_bundle
    for t in tasks:
        expected = _nanochat_reference(model, tok, t, 64)
        result = evaluate_task(model, tok, t, CPU, 64, 64 * 8)
        assert result.correct == expected, t.label


def test_rows_are_packed_into_few_forwards():
    items = [{"query": f"Question {i}", "choices": ["yes", "no", "maybe"], "gold": 0} for i in range(20)]
    model = TableLM(table())
    evaluate_task(model, byte_tokenizer(), task("multiple_choice", items), CPU, None, 16 * 20)
    assert model.rows_seen == 60 and model.forwards <= 4  # 60 rows of <= 16 tokens, 20 rows per forward
    model = TableLM(table())
    evaluate_task(model, byte_tokenizer(), task("multiple_choice", items), CPU, None, 16 * 20, max_rows=1)
    assert model.forwards == 60


def test_mean_losses_do_not_depend_on_padding(gpt_and_bundle):
    model, tok, tasks = gpt_and_bundle
    t = tasks[0]
    rows = core.build_rows(t, prepare_items(t.items, None), range(len(t.items)), tok, 64, {})
    packed, _ = score_rows(model, rows, tok.bos_id, CPU, 64 * 16)
    alone, _ = score_rows(model, rows, tok.bos_id, CPU, 64, max_rows=1)
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------
# bad bundles: clear errors before any work, or skipped tasks with a reason

def _bundle(tmp_path) -> Path:
    return make_eval_bundle(tmp_path / "bundle", items_per_task=6)


def _edit_line(path: Path, lineno: int, fn) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_text("".join(lines))


def test_generated_bundle_loads(tmp_path):
    tasks, skipped = load_bundle(_bundle(tmp_path))
    assert [(t.label, t.kind, t.num_fewshot, t.baseline, len(t.items)) for t in tasks] == [
        ("toy_mc", "multiple_choice", 2, 25.0, 6), ("toy_schema", "schema", 1, 50.0, 6), ("toy_lm", "language_modeling", 0, 0.0, 6)]
    assert skipped == {}


def test_missing_bundle_and_missing_task_file(tmp_path):
    with pytest.raises(BundleError, match="core.yaml: missing"):
        load_bundle(tmp_path / "nowhere")
    bundle = _bundle(tmp_path)
    (bundle / "eval_data/toy/toy_schema.jsonl").unlink()
    with pytest.raises(BundleError, match=r"toy_schema: data file .*toy_schema.jsonl is missing"):
        load_bundle(bundle)


def test_malformed_json_names_file_and_line(tmp_path):
    bundle = _bundle(tmp_path)
    _edit_line(bundle / "eval_data/toy/toy_mc.jsonl", 3, lambda line: line[:-5] + "\n")
    with pytest.raises(BundleError, match=r"toy_mc.jsonl:3: malformed JSON"):
        load_bundle(bundle)


def test_gold_out_of_range_and_identical_choices(tmp_path):
    bundle = _bundle(tmp_path)
    path = bundle / "eval_data/toy/toy_mc.jsonl"
    _edit_line(path, 2, lambda line: json.dumps({**json.loads(line), "gold": 4}) + "\n")
    with pytest.raises(BundleError, match=r"toy_mc.jsonl:2: gold 4 is not an index into its 4 options"):
        load_bundle(bundle)
    _edit_line(path, 2, lambda line: json.dumps({**json.loads(line), "gold": 0, "choices": ["same"] * 4}) + "\n")
    with pytest.raises(BundleError, match=r"toy_mc.jsonl:2: all options are identical"):
        load_bundle(bundle)


def test_unknown_task_type_and_skip_with_warning(tmp_path, caplog):
    bundle = _bundle(tmp_path)
    spec = bundle / "core.yaml"
    spec.write_text(spec.read_text().replace("icl_task_type: schema", "icl_task_type: generation"))
    with pytest.raises(BundleError, match=r"toy_schema: unknown icl_task_type 'generation'"):
        load_bundle(bundle)
    with caplog.at_level("WARNING"):
        tasks, skipped = load_bundle(bundle, skip_bad=True, log=logging.getLogger("t"))
    assert [t.label for t in tasks] == ["toy_mc", "toy_lm"]
    assert "unknown icl_task_type" in skipped["toy_schema"] and "skipping CORE task toy_schema" in caplog.text


def test_task_selection_and_missing_baseline(tmp_path):
    bundle = _bundle(tmp_path)
    tasks, _ = load_bundle(bundle, labels=["toy_lm"])
    assert [t.label for t in tasks] == ["toy_lm"]
    with pytest.raises(BundleError, match="no task named 'hellaswag'"):
        load_bundle(bundle, labels=["hellaswag"])
    meta = bundle / "eval_meta_data.csv"
    meta.write_text("".join(l for l in meta.read_text().splitlines(keepends=True) if not l.startswith("toy_mc")))
    with pytest.raises(BundleError, match="toy_mc: no 'Random baseline' row"):
        load_bundle(bundle)


# ---------------------------------------------------------------------------
# the real bundle's format (skipped when ../shared beside the checkout is absent)

@pytest.mark.skipif(not REAL_BUNDLE.exists(), reason="real eval bundle not present")
def test_real_bundle_parses_and_renders_like_nanochats_templates():
    jinja2 = pytest.importorskip("jinja2")
    tasks, skipped = load_bundle(REAL_BUNDLE)
    assert len(tasks) == 20 and skipped == {}
    baselines = {t.label: t.baseline for t in tasks}
    assert baselines["boolq"] == 62.0 and baselines["bigbench_language_identification"] == 9.1
    delims = {t.label: t.delimiter for t in tasks}
    assert delims["arc_easy"] == "\nAnswer: " and delims["copa"] == " "
    # nanochat's jinja templates (whitespace control and all), rendered on the real items
    shot = "{%- for example in fewshot_examples -%}\n"
    mc = jinja2.Template((shot + "{{ example.query }}{{ d }}{{ example.choices[example.gold] }}\n\n{% endfor -%}\n"
                          "{{ item.query }}{{ d }}{{ choice }}").strip())
    sc = jinja2.Template((shot + "{{ example.context_options[example.gold] }}{{ d }}{{ example.continuation }}\n\n"
                          "{% endfor -%}\n{{ context }}{{ d }}{{ item.continuation }}").strip())
    lm = jinja2.Template((shot + "{{ example.context | trim }}{{ d }}{{ example.continuation }}\n\n{% endfor -%}\n"
                          "{{ item.context | trim }}{{ d }}{% if inc %}{{ item.continuation }}{% endif %}").strip())
    for t in tasks:
        data = prepare_items(t.items, 40)
        for i, item in enumerate(data):
            shots = [data[j] for j in fewshot_indices(len(data), i, t.num_fewshot)]
            ctx = {"fewshot_examples": shots, "d": t.delimiter, "item": item}
            if t.kind == "multiple_choice":
                ref = [mc.render(choice=c, **ctx) for c in item["choices"]]
            elif t.kind == "schema":
                ref = [sc.render(context=c, **ctx) for c in item["context_options"]]
            else:
                ref = [lm.render(inc=False, **ctx).strip(), lm.render(inc=True, **ctx)]
            assert render_prompts(t.kind, item, t.delimiter, shots) == ref, (t.label, i)


# ---------------------------------------------------------------------------
# prefix sharing: the options' common prefix forwarded once gives what full rows give

from nanoforge.evaluation import prefix  # noqa: E402


@pytest.fixture(scope="module")
def gqa_gpt_and_bundle(gpt_and_bundle):
    """The same tokenizer and bundle with a grouped-query model (2 query heads per key/value head)."""
    from nanoforge.model.gpt import GPT, GPTConfig

    _, tok, tasks = gpt_and_bundle
    torch.manual_seed(1)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval(), tok, tasks


@pytest.mark.parametrize("which", ["gpt_and_bundle", "gqa_gpt_and_bundle"])
@pytest.mark.parametrize("max_len", [None, 64, 40])
def test_shared_prefix_scores_equal_full_rows(request, which, max_len):
    model, tok, tasks = request.getfixturevalue(which)
    shared_somewhere = False
    for t in tasks:
        data = prepare_items(t.items, None)
        rows = core.build_rows(t, data, range(len(data)), tok, max_len, {})
        full, full_exact = score_rows(model, rows, tok.bos_id, CPU, 64 * 8)
        shared, shared_exact, tokens = prefix.score_rows_shared(model, rows, tok.bos_id, CPU, 64 * 8)
        spans = [e - s for *_, s, e in rows]
        # summed log-probs of every option's span, and the per-item decisions
        assert [m * n for m, n in zip(shared, spans)] == pytest.approx([m * n for m, n in zip(full, spans)], abs=1e-4)
        assert shared_exact == full_exact, t.label
        for i in range(len(data)):
            f = [full[r] for r, row in enumerate(rows) if row[0] == i]
            s = [shared[r] for r, row in enumerate(rows) if row[0] == i]
            assert s.index(min(s)) == f.index(min(f)), (t.label, i)
        assert tokens["row_tokens"] == sum(len(r[2]) for r in rows)
        shared_somewhere |= tokens["packed_tokens"] < tokens["row_tokens"]
    assert shared_somewhere  # otherwise this test would compare full rows with full rows


def test_uncropped_multiple_choice_forwards_the_prefix_once(gpt_and_bundle):
    model, tok, tasks = gpt_and_bundle
    t = next(t for t in tasks if t.kind == "multiple_choice")
    data = prepare_items(t.items, None)
    rows = core.build_rows(t, data, range(len(data)), tok, None, {})
    groups = prefix.group_rows(rows)
    assert len(groups) == len(data)  # one group per item: every option shares the item's prefix
    for members, shared in groups:
        assert shared == rows[members[0]][3]  # the prefix is everything before the answers
    _, _, tokens = prefix.score_rows_shared(model, rows, tok.bos_id, CPU, 64 * 8)
    expected = sum(shared + sum(len(rows[r][2]) - shared for r in members) for members, shared in groups)
    assert tokens["packed_tokens"] == expected


def test_tree_forward_of_one_row_is_the_models_forward(gqa_gpt_and_bundle):
    """The tree forward mirrors GPT.forward; a change to one not made in the other fails here."""
    model, tok, _ = gqa_gpt_and_bundle
    ids = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(30).expand(2, 30)
    seg = torch.zeros(2, 30, dtype=torch.long)
    select = torch.tensor([(b, t) for b in range(2) for t in range(30)])
    got = prefix.tree_forward(model, ids, pos, seg, select).view(2, 30, -1)
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(got, full, atol=1e-5)
        # a few positions, in any order, uneven per row: the last block runs at those only
        some = select[torch.randperm(60, generator=torch.Generator().manual_seed(1))[:7]]
        assert torch.allclose(prefix.tree_forward(model, ids, pos, seg, some), full[some[:, 0], some[:, 1]], atol=1e-5)


def test_evaluate_task_shares_and_reports_tokens(gpt_and_bundle):
    model, tok, tasks = gpt_and_bundle
    t = next(t for t in tasks if t.kind == "multiple_choice")
    shared = evaluate_task(model, tok, t, CPU, None, 64 * 8)
    full = evaluate_task(model, tok, t, CPU, None, 64 * 8, share_prefix=False)
    assert shared.correct == full.correct
    assert shared.row_tokens == full.row_tokens == full.forwarded_tokens
    assert shared.forwarded_tokens < 0.6 * shared.row_tokens
