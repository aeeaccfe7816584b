"""Planning the train stage: every check, before any work.

`plan_run` validates the params, the batch arithmetic at the real world size, the
manifest and shards, the tokenizer, `--init-from`, and decides whether the checkpoint
in artifacts/checkpoints resumes this run. It reads files and builds the model on the
meta device (no memory); it writes nothing, so a refusal leaves everything as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanoforge.common import CHECKPOINT_DIR, FINEWEB_DIR, TOKENIZER_DIR, read_json
from nanoforge.config import ConfigError, TrainConfig
from nanoforge.data.shards import read_manifest, train_shard_paths, val_shard_path
from nanoforge.tokenizer.bpe import load_tokenizer
from nanoforge.training.checkpoint import CheckpointError, archive_dir, compat_diff, latest_checkpoint, read_meta

RESUME_ENV = "NANOFORGE_RESUME"  # auto (default) | fresh
INIT_ENV = "NANOFORGE_INIT_FROM"


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
    same = ("depth", "n_kv_head", "max_seq_len", "total_batch_size", "seed", "matrix_lr", "embedding_lr",
            "unembedding_lr", "weight_decay", "grad_clip", "warmup_ratio", "warmdown_ratio", "final_lr_frac")
    return {
        **{f"train.{k}": getattr(cfg, k) for k in same},
        "train horizon (steps)": num_iterations,
        "tokenizer (sha256 of artifacts/tokenizer/tokenizer.tiktoken)": tokenizer.meta.get("ranks_sha256"),
        "training shards (index, sha256)": [[i, shards.get(i)] for i in manifest["train_shards"]],
    }  # the model's shape follows from depth, n_kv_head, max_seq_len and the tokenizer


def plan_run(cfg: TrainConfig, world_size: int, resume_mode: str, init_from: str | None,
             checkpoint_dir: Path = CHECKPOINT_DIR) -> Plan:
    """Validate inputs and decide the run; raises (ValueError family) with a message naming problem and fix."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth

    if resume_mode not in ("auto", "fresh"):
        raise ConfigError(f"{RESUME_ENV}={resume_mode!r}: expected 'auto' (resume when possible) or 'fresh'")
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
                train_paths, val_path, tokenizer, compat, init_from=init_path)

    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None and resume_mode == "auto":
        meta = read_meta(latest)
        diff = compat_diff(meta.get("compat", {}), compat)
        if init_path is not None and str(init_path) != str(meta.get("init_from")):
            # an explicit --init-from means "start a new run from those weights", not "resume another one"
            diff.append(f"init from: {meta.get('init_from')!r} -> {str(init_path)!r}")
        if diff:
            raise CheckpointError(refusal_message(latest, diff, checkpoint_dir))
        plan.resume_from = latest
        plan.init_from = Path(meta["init_from"]) if meta.get("init_from") else None  # lineage, not reloaded
    return plan


def refusal_message(latest: Path, diff: list[str], checkpoint_dir: Path) -> str:
    lines = "\n".join(f"    {d}" for d in diff)
    return (
        f"cannot resume from {latest}: it was written by a different run configuration:\n{lines}\n"
        "  Ways out:\n"
        "    - resume it: put those params back as they were;\n"
        f"    - start fresh (old checkpoints move to {archive_dir(checkpoint_dir)}/<time>/, nothing is deleted):\n"
        f"        {RESUME_ENV}=fresh dvc repro train     or: python -m stages.train --fresh\n"
        "    - fine-tune from it with the new params (weights only; new optimizer and schedule):\n"
        f"        {RESUME_ENV}=fresh {INIT_ENV}={latest} dvc repro train\n"
        f"        or: python -m stages.train --fresh --init-from {latest}"
    )


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
