"""Planning the train stage: every check, before any work.

`plan_run` validates the params, the processes per node against the GPUs, the batch
arithmetic at the real world size, the manifest and shards, the tokenizer, `--init-from`,
whether the model fits in the device's memory (`estimate_memory`, also behind
`python -m bench.memory`), and decides whether the checkpoint in artifacts/checkpoints
resumes this run. It reads files and builds the model on the meta device (no memory); it
writes nothing (for checkpoints over 1 GiB, rank 0 times a 256 MiB write beside them and
deletes it, to warn when a save would outlast torchrun's SIGTERM-to-SIGKILL window), so a
refusal leaves everything as it was.

A params change is a new run: the latest checkpoint resumes only when its compat key
(the math: model shape, batch, schedule, seed, horizon, tokenizer, shards) matches;
otherwise the plan says so and the run archives the old checkpoints and starts fresh.

`run_dirs` decides where a run writes: the pipeline's folders, or, for a one-off run
whose `--set` overrides change the math, artifacts/oneoff/<hash>/ (see stages/train.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nanoforge.common import ARTIFACTS_DIR, CHECKPOINT_DIR, FINEWEB_DIR, MODEL_DIR, TOKENIZER_DIR, TRAIN_DIR, read_json
from nanoforge.config import DEFAULT_DATASET, RECIPE_KEYS, RECIPES, ConfigError, TrainConfig
from nanoforge.gpus import check_processes_fit_gpus
from nanoforge.data.shards import check_dataset, read_manifest, train_shard_paths, val_shard_path
from nanoforge.tokenizer.bpe import load_tokenizer
from nanoforge.training.checkpoint import CheckpointError, compat_diff, latest_checkpoint, read_meta

RESUME_ENV = "NANOFORGE_RESUME"  # auto (default) | fresh
INIT_ENV = "NANOFORGE_INIT_FROM"
RUN_DIR_ENV = "NANOFORGE_RUN_DIR"  # set: the run writes {checkpoints,model,train} under it
ONEOFF_DIR = ARTIFACTS_DIR / "oneoff"
# the params that change the math (what compat_key holds, plus what sets the horizon)
# (embedding_lr, unembedding_lr, grad_clip, warmdown_ratio, final_lr_frac are recipe options: below)
MATH_KEYS = ("depth", "n_kv_head", "max_seq_len", "total_batch_size", "seed", "matrix_lr", "weight_decay",
             "warmup_ratio", "loader_buffer_docs", "fp8")
HORIZON_KEYS = ("num_iterations", "target_flops", "target_param_data_ratio")
# train.recipe and its options change the math too; compat holds their values as resolved from the recipe
RECIPE_MATH_KEYS = ("recipe",) + RECIPE_KEYS
# what a checkpoint written before the recipe options existed was trained with (its LR and schedule
# keys were recorded under the same names, resolved, so they come from its meta, not from here)
RECIPE_2025_COMPAT = {"train.recipe": "2025", **{f"train.{k}": v for k, v in RECIPES["2025"].items()}}
# ... and before train.fp8 and the best-fit buffer existed: what a checkpoint without those keys had
LEGACY_COMPAT = {**RECIPE_2025_COMPAT, "train.loader_buffer_docs": 1000, "train.fp8": False}


@dataclass(frozen=True)
class RunDirs:
    """The folders a train run writes."""

    checkpoints: Path = CHECKPOINT_DIR
    model: Path = MODEL_DIR
    train: Path = TRAIN_DIR


PIPELINE_DIRS = RunDirs()


def run_dirs(base: TrainConfig, cfg: TrainConfig) -> tuple[RunDirs, dict]:
    """(where to write, the math params `cfg` changes from params.yaml's `base`).

    A one-off run that changes the math gets artifacts/oneoff/<hash of the changes>/, so
    it can never write into the pipeline's checkpoints or outputs; running it again with
    the same overrides resumes it there.
    """
    keys = MATH_KEYS + HORIZON_KEYS + RECIPE_MATH_KEYS
    changed = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != getattr(base, k)}
    if os.environ.get(RUN_DIR_ENV):  # a sweep cell (stages/sweep.py): its own folder, artifacts/sweep/<cell>/
        root = Path(os.environ[RUN_DIR_ENV])
        return RunDirs(root / "checkpoints", root / "model", root / "train"), changed
    if not changed:
        return PIPELINE_DIRS, {}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = ONEOFF_DIR / digest
    return RunDirs(root / "checkpoints", root / "model", root / "train"), changed


@dataclass
class Plan:
    """Everything decided before any work: what to train, on what, for how long, from where."""

    cfg: TrainConfig
    world_size: int
    accum: int
    model_config: object
    num_params: int
    num_embedding_params: int
    flops_per_token: int
    num_iterations: int
    horizon_source: str
    train_paths: list
    val_path: Path | None
    tokenizer: object
    compat: dict
    dirs: RunDirs = PIPELINE_DIRS
    memory: dict = field(default_factory=dict)  # the rough estimate the plan checked
    latest: Path | None = None  # the newest checkpoint in dirs.checkpoints when planned
    restart: list[str] = field(default_factory=list)  # why `latest` cannot resume: archive it, start fresh
    resume_from: Path | None = None
    init_from: Path | None = None
    init_weights: dict | None = None  # read before old checkpoints are archived (the path may move)
    save_estimate: dict = field(default_factory=dict)  # checkpoint size and write time (large models)


def resolve_horizon(cfg: TrainConfig, num_params: int, flops_per_token: int) -> tuple[int, str]:
    """Precedence: explicit num_iterations > target_flops > target_param_data_ratio."""
    if cfg.num_iterations is not None:
        return cfg.num_iterations, "num_iterations"
    if cfg.target_flops is not None:
        return max(1, round(cfg.target_flops / (flops_per_token * cfg.total_batch_size))), "target_flops"
    return max(1, int(cfg.target_param_data_ratio * num_params) // cfg.total_batch_size), "target_param_data_ratio"


def compat_key(cfg: TrainConfig, num_iterations: int, tokenizer, manifest: dict) -> dict:
    """What must match for a checkpoint to resume this run exactly, named as the user knows it."""
    shards = {s["index"]: s.get("sha256") for s in manifest.get("shards", [])}
    return {
        **{f"train.{k}": getattr(cfg, k) for k in MATH_KEYS},
        "train.recipe": cfg.recipe,
        **{f"train.{k}": v for k, v in cfg.recipe_options().items()},
        "train horizon (steps)": num_iterations,
        "tokenizer (sha256 of artifacts/tokenizer/tokenizer.tiktoken)": tokenizer.meta.get("ranks_sha256"),
        # the same ranks under another pre-split regex tokenize text differently (absent in old tokenizers: None)
        "tokenizer split pattern (artifacts/tokenizer/tokenizer.json)": tokenizer.meta.get("split_pattern"),
        "training shards (index, sha256)": [[i, shards.get(i)] for i in manifest["train_shards"]],
    }  # the model's shape follows from depth, n_kv_head, max_seq_len and the tokenizer


def plan_run(cfg: TrainConfig, world_size: int, resume_mode: str, init_from: str | None,
             dirs: RunDirs = PIPELINE_DIRS, dataset: str = DEFAULT_DATASET) -> Plan:
    """Validate inputs and decide the run; raises (ValueError family) with a message naming problem and fix."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth

    if resume_mode not in ("auto", "fresh"):
        raise ConfigError(f"{RESUME_ENV}={resume_mode!r}: expected 'auto' (resume when possible) or 'fresh'")
    check_processes_fit_gpus("train", cfg.nproc_per_node, cfg.device)  # before torch touches a device
    accum = TrainConfig.batch_geometry(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    manifest = read_manifest(FINEWEB_DIR / "MANIFEST.json")
    check_dataset(manifest, dataset, FINEWEB_DIR / "MANIFEST.json")  # download.dataset switched, data/ did not
    train_paths = train_shard_paths(manifest, FINEWEB_DIR)
    val_path = val_shard_path(manifest, FINEWEB_DIR) if cfg.eval_every else None
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    model_config = config_for_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.n_kv_head,
                                    **cfg.model_options())
    with torch.device("meta"):  # count without allocating
        meta_model = GPT(model_config)
    num_params, num_emb = meta_model.num_params(), meta_model.num_embedding_params()
    flops_per_token = meta_model.estimate_flops()
    num_iterations, source = resolve_horizon(cfg, num_params, flops_per_token)
    memory = check_memory(cfg, model_config, num_params)

    init_path = Path(init_from) if init_from else None
    if init_path is not None:
        from nanoforge.training.checkpoint import CONFIG, META, WEIGHTS

        if not (init_path / WEIGHTS).exists() or not ((init_path / META).exists() or (init_path / CONFIG).exists()):
            raise CheckpointError(
                f"--init-from {init_path}: not a checkpoint folder (step_NNNNNN/) or a model folder (artifacts/model/)"
            )
        init_meta = read_json(init_path / CONFIG) if (init_path / CONFIG).exists() else read_meta(init_path)
        shape = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # sequence_len may change: RoPE has no weights
        old_model, new_model = init_meta.get("model", {}), model_config.to_dict()
        diff = compat_diff({"model": {k: old_model.get(k) for k in shape}}, {"model": {k: new_model[k] for k in shape}})
        if diff:
            raise CheckpointError(
                f"--init-from {init_path}: its weights are for another model shape, so they cannot start this one:\n"
                + "\n".join(f"    {d}" for d in diff)
                + "\n  Set train.depth / train.n_kv_head / train.max_seq_len (and the tokenizer) to match it"
            )
    compat = compat_key(cfg, num_iterations, tokenizer, manifest)
    plan = Plan(cfg, world_size, accum, model_config, num_params, num_emb, flops_per_token, num_iterations, source,
                train_paths, val_path, tokenizer, compat, dirs=dirs, memory=memory, init_from=init_path)

    plan.latest = latest = latest_checkpoint(dirs.checkpoints)
    if latest is not None and resume_mode == "auto":
        meta = read_meta(latest)
        diff = compat_diff({**LEGACY_COMPAT, **meta.get("compat", {})}, compat)
        if init_path is not None and str(init_path) != str(meta.get("init_from")):
            # an explicit --init-from means "start a new run from those weights", not "resume another one"
            diff.append(f"init from: {meta.get('init_from')!r} -> {str(init_path)!r}")
        if diff:
            plan.restart = diff  # a params change is a new run
        else:
            plan.resume_from = latest
            plan.init_from = Path(meta["init_from"]) if meta.get("init_from") else None  # lineage, not reloaded
    check_save_time(plan)
    return plan


def restart_message(plan: Plan, moved: Path | None) -> str:
    """One line: why the latest checkpoint does not resume, and where it went."""
    return (f"new run, starting fresh: the params changed since {plan.latest} ({'; '.join(plan.restart)}); "
            f"its checkpoints moved to {moved} (nothing is deleted; --init-from one of them fine-tunes from it)")


# ---------------------------------------------------------------------------
# memory: refuse a model that cannot fit before the allocator finds out

# Bytes one token keeps for backward per layer and unit of width, bf16 autocast. Eager: 48,
# measured on CPU with saved-tensor hooks (q/k/v, rotary and norm temporaries, the 4x MLP
# hidden three times); fp32 runs keep 1.5x that. Compiled (inductor fuses and recomputes the
# elementwise chains): 32, which with the head below puts d20 at device batch 32 at ~80 GiB,
# as nanochat's issue #443 saw on an 80 GB H100 (72.5 GiB in use when an 8 GiB buffer failed).
BLOCK_BYTES_PER_WIDTH = {"eager": 48, "compiled": 32}
# Bytes a token needs for the LM head's logits at the peak of backward, per vocabulary entry,
# when the whole batch's logits exist at once (CPU training): eager keeps the tanh output and
# the log-softmax in fp32 and holds two fp32 gradients at once (16); compiled, the bf16 logits
# and one fp32 gradient (6). On CUDA the loss runs in checkpointed chunks (model/gpt.py): one
# chunk's worth at the eager rate, whatever the batch.
HEAD_BYTES_PER_VOCAB = {"eager": 16, "compiled": 6}
# no-grad forward (BPB): one layer's temporaries a token (about 32 bytes per width) over the
# fp32 hidden state, and the chunked head: a chunk's bf16 and fp32 logits and log-softmax
EVAL_BYTES_PER_WIDTH = 32
EVAL_HEAD_BYTES_PER_VOCAB = 10


def uses_compile(cfg: TrainConfig, device_type: str) -> bool:
    """What the loop will do (training/loop.py): compile on, or auto on CUDA."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")


def estimate_memory(cfg: TrainConfig, model_config, num_params: int, compiled: bool | None = None,
                    device_batch_size: int | None = None, cuda: bool | None = None) -> dict:
    """Bytes one rank needs to train, by part; `total` is the peak: state + the larger of a
    training micro-step and an in-training val BPB pass (they never overlap).

    - weights and gradients fp32 (4 + 4 bytes a parameter; DDP's buckets are the gradients);
    - optimizer state: Muon's momentum (4 bytes a block matrix entry), AdamW's two moments for
      the embedding and LM head (8), and Muon's step transient (its largest same-shape stack:
      an fp32 update and bf16 Newton-Schulz copies, ~12 bytes an entry). Sharded (train.shard_optimizer,
      more than one rank: shard.py) a rank holds 1/world of the state and of each stack, and the step's
      broadcast needs its own share of the weights flat plus one owner's received (4 + 4 bytes / world);
    - activations of one micro-batch (BLOCK_BYTES_PER_WIDTH, HEAD_BYTES_PER_VOCAB);
    - the eval transient: the hidden states plus one chunk of the head.
    `cuda` and `compiled` None: decided from cfg.device and cfg.compile as the loop decides them.
    """
    from nanoforge.model.gpt import LOSS_CHUNK_BYTES

    cuda = _cuda_planned(cfg.device) if cuda is None else cuda
    compiled = uses_compile(cfg, "cuda" if cuda else "cpu") if compiled is None else compiled
    mode = "compiled" if compiled else "eager"
    batch = device_batch_size or cfg.device_batch_size
    tokens = batch * cfg.max_seq_len
    n_layer, width, vocab = model_config.n_layer, model_config.n_embd, model_config.vocab_size
    embedding = lm_head = model_config.padded_vocab_size * width
    matrices = num_params - embedding - lm_head
    largest_stack = 2 * n_layer * 4 * width * width  # the MLP's c_fc and c_proj share a shape
    chunk = min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * vocab)))
    block = BLOCK_BYTES_PER_WIDTH[mode] * (1.5 if cfg.dtype == "float32" else 1) * n_layer * width * tokens
    head = HEAD_BYTES_PER_VOCAB["eager"] * vocab * chunk if cuda else HEAD_BYTES_PER_VOCAB[mode] * vocab * tokens
    # world = processes on this node, a lower bound of the ranks: the estimate errs on the side of more memory
    shards = cfg.nproc_per_node if cfg.nproc_per_node > 1 and cfg.shard_optimizer else 1
    stack_transient = 12 * largest_stack * -(-2 * n_layer // shards) // (2 * n_layer)
    broadcast_transient = 8 * num_params // shards if shards > 1 else 0
    parts = {
        "weights": 4 * num_params,
        "gradients": 4 * num_params,
        "optimizer": (4 * matrices + 8 * (embedding + lm_head)) // shards + max(stack_transient, broadcast_transient),
        "activations": int(block + head),
        "eval_transient": tokens * (4 + EVAL_BYTES_PER_WIDTH) * width + EVAL_HEAD_BYTES_PER_VOCAB * vocab * chunk,
    }
    state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    return {**parts, "weights_grads_optimizer": state, "compiled": compiled, "cuda": cuda, "device_batch_size": batch,
            "total": state + max(parts["activations"], parts["eval_transient"]),
            "optimizer_state": (4 * matrices + 8 * (embedding + lm_head)) // shards, "optimizer_shards": shards}


def _cuda_planned(device_name: str) -> bool:
    if device_name in ("cpu", "mps"):
        return False
    from nanoforge.gpus import visible_gpus

    return device_name == "cuda" or visible_gpus() > 0


def largest_fitting_batch(cfg: TrainConfig, model_config, num_params: int, budget: int, compiled: bool,
                          cuda: bool | None = None) -> int:
    """The largest device batch up to the configured one that splits train.total_batch_size evenly
    (at train.nproc_per_node) and whose estimate fits `budget` (0: none)."""
    for batch in range(cfg.device_batch_size, 0, -1):
        if cfg.total_batch_size % (batch * cfg.max_seq_len * cfg.nproc_per_node):
            continue
        if estimate_memory(cfg, model_config, num_params, compiled, batch, cuda)["total"] <= budget:
            return batch
    return 0


def available_memory(device_name: str) -> tuple[int | None, str]:
    """(bytes this rank may use, where that number comes from); None when unknown."""
    import torch

    from nanoforge.runtime import pick_device

    device = pick_device(device_name)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        free, _total = torch.cuda.mem_get_info(local_rank)
        return free, f"free on cuda:{local_rank} (torch.cuda.mem_get_info)"
    if device.type == "cpu":
        import psutil

        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # the ranks on this host share its RAM
        share = f", shared by {ranks} ranks" if ranks > 1 else ""
        return psutil.virtual_memory().available // ranks, f"available RAM{share} (psutil)"
    return None, device.type


def check_memory(cfg: TrainConfig, model_config, num_params: int) -> dict:
    need = estimate_memory(cfg, model_config, num_params)
    have, where = available_memory(cfg.device)
    need["available"] = have
    if have is not None and need["total"] > have:
        gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
        fits = largest_fitting_batch(cfg, model_config, num_params, have, need["compiled"])
        hint = f"; train.device_batch_size={fits} fits" if fits else ""
        if not need["compiled"]:
            with_compile = estimate_memory(cfg, model_config, num_params, compiled=True)["total"]
            if with_compile <= have:
                hint += (f"; or train.compile=on: compiled it needs about {gib(with_compile)} (eager keeps "
                         "about 1.5x the activations and 2.7x the logits for backward)")
        raise ConfigError(
            f"train.depth={cfg.depth} ({num_params:,} params) needs about {gib(need['total'])} per rank: "
            f"{gib(need['weights_grads_optimizer'])} for weights, gradients and optimizer state, "
            f"{gib(need['activations'])} of {'compiled' if need['compiled'] else 'eager'} activations for "
            f"train.device_batch_size={cfg.device_batch_size} x "
            f"train.max_seq_len={cfg.max_seq_len}; this device has {gib(have)} {where}. "
            "Lower train.depth (the weights) or train.device_batch_size (the activations; the total batch stays, "
            f"more accumulation steps make it up){hint}"
        )
    return need


# ---------------------------------------------------------------------------
# preemption: torchrun SIGKILLs its workers a grace window after SIGTERM

SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun --shutdown-timeout reads it (default 30 s)
PROBE_BYTES = 256 * 2**20
PROBE_ABOVE = 2**30  # smaller checkpoints take a second or two anywhere: no probe


def checkpoint_bytes(model_config, num_params: int) -> int:
    """The size of one checkpoint: fp32 weights, Muon's momentum, AdamW's two moments."""
    embedding = lm_head = model_config.padded_vocab_size * model_config.n_embd
    matrices = num_params - embedding - lm_head
    return 4 * num_params + 4 * matrices + 8 * (embedding + lm_head)


def grace_seconds() -> float:
    """Seconds between torchrun's SIGTERM and its SIGKILL."""
    try:
        return float(os.environ.get(SHUTDOWN_TIMEOUT_ENV) or 30)
    except ValueError:
        return 30.0


def disk_write_speed(directory: Path, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s of a write of `nbytes` to `directory`'s disk, fsync included (the sustained rate,
    not the page cache's); the probe file is removed."""
    import tempfile
    import time

    directory = Path(directory)
    while not directory.exists():  # the checkpoint folder may not exist yet: its nearest parent
        directory = directory.parent
    block = os.urandom(2**20)
    fd, name = tempfile.mkstemp(prefix=".nanoforge-probe.", dir=directory)
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, nbytes // len(block))):
            os.write(fd, block)
        os.fsync(fd)
        return nbytes / max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)
        os.unlink(name)


def save_warning(size: int, speed: float, window: float, where: Path) -> str | None:
    """One line when writing a checkpoint of `size` bytes at `speed` would outlast the grace window."""
    seconds = size / speed
    if seconds <= window:
        return None
    return (f"a SIGTERM may lose work: a checkpoint is {size / 1e9:.1f} GB, about {seconds:.0f} s to write at "
            f"{speed / 1e6:.0f} MB/s (measured in {where}) after the step in flight, longer than torchrun's "
            f"{window:.0f} s before SIGKILL. "
            f"Raise the window ({SHUTDOWN_TIMEOUT_ENV}={int(seconds * 2 + 30)} dvc repro, or torchrun "
            "--shutdown-timeout), or put artifacts/checkpoints on a faster disk; the last train.save_every "
            "checkpoint is what a kill keeps")


def check_save_time(plan: Plan) -> None:
    """Rank 0, at start: estimate the save against the grace window and warn in one line."""
    size = checkpoint_bytes(plan.model_config, plan.num_params)
    if int(os.environ.get("RANK", "0")) != 0 or size < PROBE_ABOVE:
        return
    speed = disk_write_speed(plan.dirs.checkpoints)
    plan.save_estimate = {"bytes": size, "write_bytes_per_s": speed, "seconds": size / speed,
                          "grace_seconds": grace_seconds()}
    message = save_warning(size, speed, grace_seconds(), plan.dirs.checkpoints)
    if message:
        from nanoforge.common import get_logger

        get_logger("train").warning("%s", message)


def start_runtime(plan: Plan, log=None):
    """`init_runtime` for this plan: its device and dtype (`auto` on a CPU probes one block of this
    model at this device batch, nanoforge/runtime.py), and the process group with its timeout."""
    from nanoforge.runtime import ProbeShape, init_runtime

    cfg = plan.cfg
    return init_runtime(cfg.device, cfg.dtype, cfg.collective_timeout_s, "train.collective_timeout_s",
                        ProbeShape.of(plan.model_config, cfg.device_batch_size), log)


def describe(plan: Plan, runtime) -> str:
    """The one line that says what this run is."""
    cfg = plan.cfg
    return (
        f"model: depth {cfg.depth}, {plan.num_params:,} params ({plan.num_embedding_params:,} embedding), "
        f"{plan.flops_per_token:,} FLOPs/token | horizon {plan.num_iterations} steps ({plan.horizon_source}), "
        f"{plan.num_iterations * cfg.total_batch_size:,} tokens | world {plan.world_size} x device batch "
        f"{cfg.device_batch_size} x seq {cfg.max_seq_len} x accum {plan.accum} = {cfg.total_batch_size} tokens/step | "
        f"{runtime.device} {str(runtime.dtype).replace('torch.', '')}"
    )
