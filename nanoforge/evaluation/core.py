"""DCLM's CORE metric, scored exactly as nanochat scores it, but batched.

Notable:
- Same data path as nanochat (so numbers compare): every line of a task, shuffled
  with random.Random(1337), optionally cut to `max_per_task`; few-shot examples
  for item i from random.Random(1234 + i).sample over the other items.
- Same prompts, character for character (nanochat renders them with jinja; the
  f-strings below produce the same text): each shot is `<query><delim><gold>` and a
  blank line. multiple_choice scores the tokens after the options' common prefix,
  schema the common suffix, language_modeling the continuation after the
  stripped prompt (correct only if greedy argmax reproduces every token).
  BOS first; a sequence longer than the context keeps its last tokens. The option
  with the lowest *mean* loss over its span wins; ties go to the first option.
- Not nanochat's loop: nanochat runs one forward per item. Here the rows (one per
  option) of a task's items are sorted by length and packed into padded batches
  up to a token budget, so most forwards carry many items. Right padding with BOS
  cannot change a causal model's logits at the real positions. With nanoforge's GPT
  the options of an item go further: their shared prefix runs once (prefix.py).
- Where nanochat would produce a NaN score or crash, we keep one token in the span
  and count it in the task's notes (never silently): an option that is a token
  prefix of another (empty span), options with no common suffix, an LM prompt
  whose stripped form is not a token prefix, a span cut by the context crop.
- Bad bundles fail before any model work: missing files, unknown task types,
  malformed JSON (file:line), a gold index out of range, all-identical options.
  With `skip_bad=True` a bad task is skipped with a warning and reported instead.
- Items spread over ranks (i % world); per-item results are all-reduced.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from nanoforge.evaluation import prefix

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
CORE_FILE = "core.yaml"
META_FILE = "eval_meta_data.csv"
DATA_SUBDIR = "eval_data"
# what a task's `notes` may count: places where nanochat would score NaN or stop, and crops
NOTES = ("empty_span_kept_last_token", "no_common_suffix_scored_last_token", "lm_prompt_not_a_token_prefix",
         "rows_cropped", "span_cut_by_crop")


class BundleError(ValueError):
    """An eval bundle (or one of its tasks) that cannot be scored honestly. The message says why."""


@dataclass
class Task:
    label: str
    kind: str  # one of TASK_TYPES
    path: Path
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy, in percent (eval_meta_data.csv)
    items: list[dict] = field(default_factory=list)  # every line of the file, in file order


@dataclass
class TaskResult:
    label: str
    accuracy: float
    centered: float
    items: int
    correct: int
    random_baseline: float
    seconds: float
    shots: int
    notes: dict[str, int] = field(default_factory=dict)
    row_tokens: int = 0  # tokens of every option's full row (what one forward per option would run)
    forwarded_tokens: int = 0  # tokens actually forwarded (fewer when options share their prefix)


# ---------------------------------------------------------------------------
# the bundle: core.yaml, eval_meta_data.csv, eval_data/**.jsonl

def read_bundle(directory: str | Path, labels: list[str] | None = None) -> tuple[list[Task], dict[str, str]]:
    """Parse core.yaml and the baselines; return (tasks without items, problems by label).

    Whole-bundle problems (no core.yaml, no csv, unknown labels asked for) raise BundleError.
    Per-task problems (unknown type, no baseline, missing file) are returned for the caller to
    raise or skip.
    """
    directory = Path(directory)
    core_path, meta_path = directory / CORE_FILE, directory / META_FILE
    for path in (core_path, meta_path):
        if not path.exists():
            raise BundleError(f"{path}: missing; download the eval bundle first (python -m stages.download)")
    try:
        spec = yaml.safe_load(core_path.read_text())
    except yaml.YAMLError as exc:
        raise BundleError(f"{core_path}: not valid YAML: {exc}") from None
    entries = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{core_path}: expected a non-empty 'icl_tasks' list")
    baselines = read_baselines(meta_path)
    tasks, problems = [], {}
    seen = set()
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise BundleError(f"{core_path}: icl_tasks entry {n} has no 'label'")
        label = entry["label"]
        if label in seen:
            raise BundleError(f"{core_path}: task '{label}' is listed twice")
        seen.add(label)
        kind = entry.get("icl_task_type")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots  # nanochat reads num_fewshot[0]
        uri = entry.get("dataset_uri")
        delimiter = entry.get("continuation_delimiter", " ")
        if kind not in TASK_TYPES:
            problems[label] = f"unknown icl_task_type {kind!r} (known: {', '.join(TASK_TYPES)})"
        elif not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            problems[label] = f"num_fewshot must be a non-negative integer (or a list of one), got {entry.get('num_fewshot')!r}"
        elif not isinstance(uri, str) or not uri:
            problems[label] = "no dataset_uri"
        elif not isinstance(delimiter, str):
            problems[label] = f"continuation_delimiter must be a string, got {delimiter!r}"
        elif label not in baselines:
            problems[label] = f"no 'Random baseline' row for it in {meta_path}"
        elif not (directory / DATA_SUBDIR / uri).exists():
            problems[label] = f"data file {directory / DATA_SUBDIR / uri} is missing"
        tasks.append(Task(label, kind, directory / DATA_SUBDIR / str(uri), shots if isinstance(shots, int) else 0,
                          delimiter if isinstance(delimiter, str) else " ", baselines.get(label, 0.0)))
    if labels is not None:
        known = [t.label for t in tasks]
        unknown = [l for l in labels if l not in known]
        if unknown:
            raise BundleError(f"{core_path}: no task named {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        tasks = [t for t in tasks if t.label in labels]
        problems = {k: v for k, v in problems.items() if k in labels}
    return tasks, problems


def read_baselines(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames or "Random baseline" not in reader.fieldnames:
            raise BundleError(f"{path}: expected columns 'Eval Task' and 'Random baseline', got {reader.fieldnames}")
        out = {}
        for lineno, row in enumerate(reader, 2):
            try:
                value = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise BundleError(f"{path}:{lineno}: 'Random baseline' is not a number: {row['Random baseline']!r}") from None
            if not 0 <= value < 100:
                raise BundleError(f"{path}:{lineno}: random baseline {value} is outside [0, 100)")
            out[row["Eval Task"]] = value
    return out


def _check_item(kind: str, item) -> str | None:
    """What is wrong with one item, or None."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"

    def strings(key):
        v = item.get(key)
        return isinstance(v, list) and len(v) >= 2 and all(isinstance(s, str) for s in v)

    if kind == "multiple_choice":
        if not isinstance(item.get("query"), str):
            return "'query' must be a string"
        if not strings("choices"):
            return "'choices' must be a list of at least two strings"
        options = item["choices"]
    elif kind == "schema":
        if not strings("context_options"):
            return "'context_options' must be a list of at least two strings"
        if not isinstance(item.get("continuation"), str):
            return "'continuation' must be a string"
        options = item["context_options"]
    else:
        if not isinstance(item.get("context"), str) or not isinstance(item.get("continuation"), str):
            return "'context' and 'continuation' must be strings"
        if not item["continuation"]:
            return "'continuation' is empty: there is nothing to score"
        return None
    gold = item.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        return f"gold {gold!r} is not an index into its {len(options)} options"
    if len(set(options)) == 1:
        return "all options are identical: any answer would score the same"
    return None


def load_items(task: Task) -> list[dict]:
    """Every item of the task's file, validated. Raises BundleError naming file:line."""
    items = []
    with open(task.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BundleError(f"{task.path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            problem = _check_item(task.kind, item)
            if problem:
                raise BundleError(f"{task.path}:{lineno}: {problem} (task '{task.label}', {task.kind})")
            items.append(item)
    if not items:
        raise BundleError(f"{task.path}: no items (task '{task.label}')")
    return items


def load_bundle(directory: str | Path, labels: list[str] | None = None, skip_bad: bool = False, log=None):
    """Tasks with their items, all validated. Returns (tasks, skipped {label: reason}).

    Any problem raises one BundleError listing every bad task, unless `skip_bad`, which
    leaves bad tasks out (with a warning) and returns their reasons.
    """
    tasks, problems = read_bundle(directory, labels)
    good = []
    for task in tasks:
        if task.label in problems:
            continue
        try:
            task.items = load_items(task)
        except (BundleError, UnicodeDecodeError, OSError) as exc:
            problems[task.label] = str(exc)
            continue
        good.append(task)
    if problems and not skip_bad:
        lines = "\n".join(f"  {label}: {reason}" for label, reason in problems.items())
        raise BundleError(
            f"eval bundle {directory}: {len(problems)} bad task(s)\n{lines}\n"
            "Fix the bundle, leave those tasks out (evaluate.core_tasks), or set evaluate.skip_bad_tasks: true"
        )
    if problems and log is not None:
        for label, reason in problems.items():
            log.warning("skipping CORE task %s: %s", label, reason)
    if not good:
        raise BundleError(f"eval bundle {directory}: no task left to evaluate")
    return good, problems


# ---------------------------------------------------------------------------
# the data path: shuffle, cut, few-shot

def prepare_items(items: list[dict], max_per_task: int | None) -> list[dict]:
    """nanochat's order: shuffle with Random(1337), then keep the first max_per_task."""
    data = list(items)
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task is not None else data


def fewshot_indices(num_items: int, index: int, num_fewshot: int) -> list[int]:
    """Few-shot examples for item `index`: Random(1234 + index).sample of the other indices.

    A task with fewer than num_fewshot + 1 items uses every other item (nanochat would fail).
    """
    if num_fewshot <= 0:
        return []
    available = [i for i in range(num_items) if i != index]
    return random.Random(1234 + index).sample(available, min(num_fewshot, len(available)))


# ---------------------------------------------------------------------------
# prompts

def render_prompts(kind: str, item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """The texts nanochat's templates render: one per option (mc, schema), or [without, with] (lm)."""
    if kind == "multiple_choice":
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if kind == "language_modeling":
        # jinja's `trim` is str.strip; the prompt without the continuation is stripped as a whole
        # so its trailing space is not a token the continuation would have absorbed
        head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
        without = f"{head}{item['context'].strip()}{delimiter}".strip()
        return [without, f"{head}{item['context'].strip()}{delimiter}{item['continuation']}"]
    raise BundleError(f"unknown task type {kind!r}")


def common_length(seqs: list[list[int]], direction: str = "left") -> int:
    """Length of the common token prefix ('left') or suffix ('right') of `seqs`."""
    shortest = min(len(s) for s in seqs)
    for i in range(shortest):
        pos = i if direction == "left" else -1 - i
        token = seqs[0][pos]
        if any(s[pos] != token for s in seqs):
            return i
    return shortest


def item_rows(kind: str, prompts: list[str], tokenizer, notes: dict) -> list[tuple[list[int], int, int]]:
    """Tokenize (BOS first) and find each row's scored span [start, end): (tokens, start, end) per row."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_id)
    if kind == "multiple_choice":
        start = common_length(tokens, "left")
        shortest = min(len(t) for t in tokens)
        if start >= shortest:  # one option is a token prefix of another: its span would be empty
            start = shortest - 1
            _note(notes, "empty_span_kept_last_token")
        return [(t, start, len(t)) for t in tokens]
    if kind == "schema":
        suffix = common_length(tokens, "right")
        if suffix == 0:  # the options' last tokens differ: no shared continuation to compare
            suffix = 1
            _note(notes, "no_common_suffix_scored_last_token")
        return [(t, len(t) - suffix, len(t)) for t in tokens]
    without, with_ = tokens
    start = len(without)
    if start >= len(with_) or with_[:start] != without:
        start = min(common_length([without, with_], "left"), len(with_) - 1)
        _note(notes, "lm_prompt_not_a_token_prefix")
    return [(with_, start, len(with_))]


def crop_rows(rows, max_len: int | None, notes: dict):
    """Keep the last max_len tokens of long rows; shift spans (a span needs a token before it)."""
    if max_len is None:
        return rows
    out = []
    for tokens, start, end in rows:
        if len(tokens) > max_len:
            cut = len(tokens) - max_len
            tokens, start, end = tokens[cut:], start - cut, end - cut
            _note(notes, "rows_cropped")
            if start < 1:
                start = 1
                _note(notes, "span_cut_by_crop")
        out.append((tokens, start, end))
    return out


def _note(notes: dict, key: str) -> None:
    notes[key] = notes.get(key, 0) + 1


# ---------------------------------------------------------------------------
# scoring

def build_rows(task: Task, data: list[dict], indices, tokenizer, max_len: int | None, notes: dict):
    """[(item index, option index, tokens, start, end)] for the items at `indices`."""
    rows = []
    for i in indices:
        shots = [data[j] for j in fewshot_indices(len(data), i, task.num_fewshot)]
        prompts = render_prompts(task.kind, data[i], task.delimiter, shots)
        spans = crop_rows(item_rows(task.kind, prompts, tokenizer, notes), max_len, notes)
        for t, s, e in spans:
            if not 1 <= s < e <= len(t):
                raise BundleError(f"task '{task.label}': item {i} (after shuffling) leaves no token to score")
        rows += [(i, option, t, s, e) for option, (t, s, e) in enumerate(spans)]
    return rows


@torch.no_grad()
def score_rows(model, rows, pad_id: int, runtime, batch_tokens: int, max_rows: int | None = None):
    """Per row: (mean loss over its span, whether argmax reproduces the span). Rows packed by length.

    A batch holds rows while rows * longest <= batch_tokens (always at least one row);
    `max_rows=1` gives one forward per row (an unbatched baseline).
    """
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][2]))
    mean_loss = [0.0] * len(rows)
    exact = [False] * len(rows)
    pos = 0
    while pos < len(order):
        longest = len(rows[order[pos]][2])
        fit = max(1, batch_tokens // longest)
        if max_rows is not None:
            fit = min(fit, max_rows)
        batch = order[pos: pos + fit]
        pos += len(batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.bool)  # positions whose *next* token is scored
        for b, r in enumerate(batch):
            tokens, start, end = rows[r][2], rows[r][3], rows[r][4]
            ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[b, start - 1: end - 1] = True
        ids = ids.to(runtime.device)
        mask = mask.to(runtime.device)
        with runtime.autocast():
            logits = model(ids)
        targets = torch.roll(ids, shifts=-1, dims=1)
        picked = logits[mask].float()  # (N, V): only the scored positions
        wanted = targets[mask]
        losses = F.cross_entropy(picked, wanted, reduction="none")
        hits = picked.argmax(dim=-1) == wanted
        row_of = mask.nonzero()[:, 0]
        counts = torch.bincount(row_of, minlength=len(batch)).clamp(min=1)
        sums = torch.zeros(len(batch), dtype=torch.float32, device=ids.device).index_add_(0, row_of, losses)
        misses = torch.zeros(len(batch), dtype=torch.long, device=ids.device).index_add_(0, row_of, (~hits).long())
        means, misses = (sums / counts).tolist(), misses.tolist()
        for b, r in enumerate(batch):
            mean_loss[r] = means[b]
            exact[r] = misses[b] == 0
    return mean_loss, exact


def centered(accuracy: float, baseline_percent: float) -> float:
    """DCLM's centering: 0 at random guessing, 1 at perfect."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_task(model, tokenizer, task: Task, runtime, max_len: int | None, batch_tokens: int,
                  max_per_task: int | None = None, max_rows: int | None = None, log=None,
                  share_prefix: bool = True) -> TaskResult:
    """Accuracy of `model` on one task; every rank must call it (results are all-reduced).

    `share_prefix` (nanoforge's GPT only, and not with `max_rows`): the options of an item
    forward their common prefix once (see prefix.py); otherwise every row runs in full.
    """
    t0 = time.perf_counter()
    data = prepare_items(task.items, max_per_task)
    shots = min(task.num_fewshot, len(data) - 1)
    if shots < task.num_fewshot and log is not None:
        log.warning("task %s has %d items: %d-shot prompts instead of %d", task.label, len(data), shots, task.num_fewshot)
    notes: dict[str, int] = {}
    mine = range(runtime.rank, len(data), runtime.world_size)
    rows = build_rows(task, data, mine, tokenizer, max_len, notes)
    if share_prefix and max_rows is None and prefix.supports(model):
        mean_loss, exact, tokens = prefix.score_rows_shared(model, rows, tokenizer.bos_id, runtime, batch_tokens)
    else:
        mean_loss, exact = score_rows(model, rows, tokenizer.bos_id, runtime, batch_tokens, max_rows)
        tokens = {"row_tokens": sum(len(r[2]) for r in rows)}
        tokens["packed_tokens"] = tokens["row_tokens"]
    # per item: lowest mean loss wins (first on ties), or LM exact match
    best: dict[int, tuple[float, int]] = {}
    correct = torch.zeros(len(data), dtype=torch.float64)
    for r, (i, option, *_rest) in enumerate(rows):
        if task.kind == "language_modeling":
            correct[i] = float(exact[r])
        elif i not in best or mean_loss[r] < best[i][0]:
            best[i] = (mean_loss[r], option)
    for i, (_, option) in best.items():
        correct[i] = float(option == data[i]["gold"])
    # one fixed vector per rank (items scored, row and forwarded tokens, then every note), so ranks reduce the same shape
    counts = torch.tensor([float(len(mine)), float(tokens["row_tokens"]), float(tokens["packed_tokens"])]
                          + [float(notes.get(k, 0)) for k in NOTES], dtype=torch.float64)
    dev = runtime.device if runtime.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    correct, counts = runtime.all_reduce_sum(correct.to(dev)), runtime.all_reduce_sum(counts.to(dev))
    num_correct = int(round(correct.sum().item()))
    if int(counts[0].item()) != len(data):
        raise RuntimeError(f"task {task.label}: {int(counts[0].item())} items scored across ranks, expected {len(data)}")
    accuracy = num_correct / len(data)
    notes = {k: int(v) for k, v in zip(NOTES, counts[3:].tolist()) if v}
    if log is not None:
        odd = {k: v for k, v in notes.items() if k != "rows_cropped"}  # crops are expected with a short context
        if odd:
            log.warning("task %s: %s (see stages/core.py)", task.label, ", ".join(f"{k}={v}" for k, v in odd.items()))
        if notes.get("rows_cropped"):
            log.info("task %s: %d rows cropped to the last %s tokens", task.label, notes["rows_cropped"], max_len)
    return TaskResult(task.label, accuracy, centered(accuracy, task.baseline), len(data), num_correct,
                      task.baseline, time.perf_counter() - t0, shots, notes, int(counts[1].item()), int(counts[2].item()))


def evaluate_core(model, tokenizer, tasks: list[Task], runtime, max_len: int | None, batch_tokens: int,
                  max_per_task: int | None = None, log=None) -> tuple[float, list[TaskResult]]:
    """CORE = mean centered accuracy over `tasks`; returns (core, per-task results)."""
    results = []
    for task in tasks:
        result = evaluate_task(model, tokenizer, task, runtime, max_len, batch_tokens, max_per_task, log=log)
        if log is not None:
            log.info("%-34s acc %.4f  centered %+.4f  (%d items, %.1fs)", task.label, result.accuracy,
                     result.centered, result.items, result.seconds)
        results.append(result)
    core = sum(r.centered for r in results) / len(results)
    if not math.isfinite(core):
        raise RuntimeError("CORE is not finite; a task produced a NaN score")
    return core, results
