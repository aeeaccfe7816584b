"""Planning the train stage: every check, before any work.

`plan_run` validates the params, the batch arithmetic at the real world size, the
manifest and shards, the tokenizer, `--init-from`, whether the model fits in the
device's memory, and decides whether the checkpoint in artifacts/checkpoints resumes
this run. It reads files and builds the model on the meta device (no memory); it writes
nothing, so a refusal leaves everything as it was.

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
from nanoforge.config import ConfigError, TrainConfig
from nanoforge.gpus import check_processes_fit_gpus
from nanoforge.data.shards import read_manifest, train_shard_paths, val_shard_path
from nanoforge.tokenizer.bpe import load_tokenizer
from nanoforge.training.checkpoint import CheckpointError, compat_diff, latest_checkpoint, read_meta

RESUME_ENV = "NANOFORGE_RESUME"  # auto (default) | fresh
INIT_ENV = "NANOFORGE_INIT_FROM"
ONEOFF_DIR = ARTIFACTS_DIR / "oneoff"
# the params that change the math (what compat_key holds, plus what sets the horizon)
MATH_KEYS = ("depth", "n_kv_head", "max_seq_len", "total_batch_size", "seed", "matrix_lr", "embedding_lr",
             "unembedding_lr", "weight_decay", "grad_clip", "warmup_ratio", "warmdown_ratio", "final_lr_frac")
HORIZON_KEYS = ("num_iterations", "target_flops", "target_param_data_ratio")


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
    changed = {k: getattr(cfg, k) for k in MATH_KEYS + HORIZON_KEYS if getattr(cfg, k) != getattr(base, k)}
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
        "train horizon (steps)": num_iterations,
        "tokenizer (sha256 of artifacts/tokenizer/tokenizer.tiktoken)": tokenizer.meta.get("ranks_sha256"),
        # the same ranks under another pre-split regex tokenize text differently (absent in old tokenizers: None)
        "tokenizer split pattern (artifacts/tokenizer/tokenizer.json)": tokenizer.meta.get("split_pattern"),
        "training shards (index, sha256)": [[i, shards.get(i)] for i in manifest["train_shards"]],
    }  # the model's shape follows from depth, n_kv_head, max_seq_len and the tokenizer


def plan_run(cfg: TrainConfig, world_size: int, resume_mode: str, init_from: str | None,
             dirs: RunDirs = PIPELINE_DIRS) -> Plan:
    """Validate inputs and decide the run; raises (ValueError family) with a message naming problem and fix."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth

    if resume_mode not in ("auto", "fresh"):
        raise ConfigError(f"{RESUME_ENV}={resume_mode!r}: expected 'auto' (resume when possible) or 'fresh'")
    check_processes_fit_gpus("train", cfg.nproc_per_node, cfg.device)  # before torch touches a device
    accum = TrainConfig.batch_geometry(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    manifest = read_manifest(FINEWEB_DIR / "MANIFEST.json")
    train_paths = train_shard_paths(manifest, FINEWEB_DIR)
    val_path = val_shard_path(manifest, FINEWEB_DIR) if cfg.eval_every else None
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    model_config = config_for_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.n_kv_head)
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
        diff = compat_diff(meta.get("compat", {}), compat)
        if init_path is not None and str(init_path) != str(meta.get("init_from")):
            # an explicit --init-from means "start a new run from those weights", not "resume another one"
            diff.append(f"init from: {meta.get('init_from')!r} -> {str(init_path)!r}")
        if diff:
            plan.restart = diff  # a params change is a new run
        else:
            plan.resume_from = latest
            plan.init_from = Path(meta["init_from"]) if meta.get("init_from") else None  # lineage, not reloaded
    return plan


def restart_message(plan: Plan, moved: Path | None) -> str:
    """One line: why the latest checkpoint does not resume, and where it went."""
    return (f"new run, starting fresh: the params changed since {plan.latest} ({'; '.join(plan.restart)}); "
            f"its checkpoints moved to {moved} (nothing is deleted; --init-from one of them fine-tunes from it)")


# ---------------------------------------------------------------------------
# memory: refuse a model that cannot fit before the allocator finds out

def estimate_memory(cfg: TrainConfig, model_config, num_params: int) -> dict:
    """A rough lower estimate in bytes of what one rank needs for training.

    fp32 weights and gradients (4 + 4 bytes a parameter) and optimizer state (AdamW's two
    moments, Muon's one momentum: at most 8 bytes); activations kept for backward, about
    16 values a token per layer and width (compile fuses the elementwise ops), plus the
    fp32 logits and their gradient for one micro-batch.
    """
    act_bytes = 4 if cfg.dtype == "float32" else 2
    tokens = cfg.device_batch_size * cfg.max_seq_len
    n_layer, width, vocab = model_config.n_layer, model_config.n_embd, model_config.vocab_size
    state = 16 * num_params
    activations = tokens * (16 * n_layer * width * act_bytes + 2 * 4 * vocab)
    return {"weights_grads_optimizer": state, "activations": activations, "total": state + activations}


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
        raise ConfigError(
            f"train.depth={cfg.depth} ({num_params:,} params) needs about {gib(need['total'])} per rank: "
            f"{gib(need['weights_grads_optimizer'])} for weights, gradients and optimizer state, "
            f"{gib(need['activations'])} of activations for train.device_batch_size={cfg.device_batch_size} x "
            f"train.max_seq_len={cfg.max_seq_len}; this device has {gib(have)} {where}. "
            "Lower train.depth (the weights) or train.device_batch_size (the activations; the total batch stays, "
            "more accumulation steps make it up)"
        )
    return need


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
