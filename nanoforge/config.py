"""params.yaml, typed and validated: one pydantic model per stage section.

Notable:
- One file holds every knob (`params.yaml`); DVC reads it as params, the stages
  read it here. The defaults below are the tiny CPU preset, and each field's
  `description` is its comment in params.yaml: `python -m nanoforge.presets`
  writes the file from them (presets/ hold only what differs).
- Bad config fails before any work, naming the key and the reason: unknown keys
  (with a did-you-mean), wrong types (strict: "4" is not an int), ranges, `.inf`
  and `.nan`, cross-field consistency, a key given twice, an empty file or a
  missing section (never a silent run on the built-in defaults).
- The depth -> shape rule is the model's own (nanoforge/model/shape.py, torch-free);
  the device and dtype names are defined here once (DEVICES, DTYPES).
- `--set key=value` overrides go through the same validation. Values are parsed
  as YAML 1.2 scalars, as DVC reads them: `1e-3` is a float, `null` is None, `on` a string.
"""

from __future__ import annotations

import argparse
import difflib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from nanoforge.model.shape import VOCAB_MULTIPLE, config_for_depth, width_and_heads

PARAMS_FILE = Path("params.yaml")
LAST_SHARD = 1822  # karpathy/fineweb-edu-100b-shuffle has shards 0..1822 (the default dataset's last)


@dataclass(frozen=True)
class Dataset:
    """One pretraining dataset on the Hub: parquet shards `shard_{i:05d}.parquet` with a `text` column."""

    repo: str  # the Hugging Face dataset repo
    shards: int  # how many it has: 0..shards-1
    val_shard: int  # the one pinned for validation (nanochat: the last)
    text_column: str = "text"

    @property
    def base_url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/resolve/main"

    @property
    def last(self) -> int:
        return self.shards - 1


# The datasets download.dataset names, in one place (checked against nanochat's nanochat/dataset.py:
# FineWeb-era 10231df BASE_URL + MAX_SHARD = 1822; HEAD 92d63d4 MAX_SHARD = 6542; both pin the last shard
# for validation and name files shard_{index:05d}.parquet). They share the file names, so a folder holds one.
DATASETS: dict[str, Dataset] = {
    "fineweb-edu": Dataset("karpathy/fineweb-edu-100b-shuffle", shards=1823, val_shard=1822),
    "climbmix": Dataset("karpathy/climbmix-400b-shuffle", shards=6543, val_shard=6542),
}
DatasetName = Literal["fineweb-edu", "climbmix"]
DEFAULT_DATASET = "fineweb-edu"
MAX_DEPTH = 128


class ConfigError(ValueError):
    """A bad params.yaml or --set override. The message names the key and the reason."""


def _integral(value: Any) -> Any:
    # Lets `max_chars: 2e9` mean an int, which YAML can only spell as a float.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


BigInt = Annotated[int, BeforeValidator(_integral)]


class Section(BaseModel):
    # allow_inf_nan: `.inf` / `.nan` are valid YAML floats but never a valid knob (a NaN at step 2, an
    # OverflowError in the socket layer); refused here with the key named
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    # the section's comment in params.yaml (each field's `description` is its key's comment)
    NOTE: ClassVar[str] = ""


# The names `device:` and `dtype:` accept, once. Each dtype but auto is a torch dtype's name
# (nanoforge.runtime.pick_dtype: getattr(torch, name)).
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16"]
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(DType)


class DownloadConfig(Section):
    dataset: DatasetName = Field(DEFAULT_DATASET, description="fineweb-edu (1823 shards, nanochat until 2026-03) "
                                                             "or climbmix (6543, nanochat HEAD)")
    num_train_shards: int = Field(2, ge=1,
                                  description="training shards are 0..n-1 (~250M characters, ~100 MB each)")
    val_shard: int | None = Field(None, ge=0,
                                  description="pinned validation shard; null = the dataset's last (1822, 6542)")
    base_url: str | None = Field(
        None,
        description="shards come from {base_url}/shard_XXXXX.parquet; null = the dataset's Hub repo. HF_ENDPOINT=<mirror>\n"
                    "replaces https://huggingface.co, NANOFORGE_MIRROR=<url or folder> both sources for a run (stages/download.py)\n"
                    "an http(s) URL")
    source_dir: str | None = Field(
        None, description="or a local folder of shard_XXXXX.parquet to copy from (wins over base_url)")
    eval_bundle_url: str = Field("https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
                                 description="the CORE eval bundle: an http(s) URL, or a local .zip or bundle folder")
    workers: int = Field(4, ge=1, le=64, description="parallel downloads")
    max_retries: int = Field(5, ge=0, le=50,
                             description="per file: backoff 1s, 2s, 4s... (+ jitter), Retry-After honoured")
    timeout_s: float = Field(30.0, gt=0, description="per request (connect, and each read)")

    # null val_shard / base_url follow the dataset, so switching download.dataset alone is enough;
    # code reads these two, never the raw fields
    @property
    def spec(self) -> Dataset:
        return DATASETS[self.dataset]

    @property
    def val_index(self) -> int:
        return self.spec.val_shard if self.val_shard is None else self.val_shard

    @property
    def shards_url(self) -> str:
        return self.spec.base_url if self.base_url is None else self.base_url

    @model_validator(mode="after")
    def _within_dataset(self):
        spec = self.spec
        if self.val_index > spec.last:
            raise ValueError(f"download.val_shard={self.val_shard} is outside {self.dataset}'s shards "
                             f"0..{spec.last} (download.dataset={self.dataset})")
        if self.num_train_shards > spec.last:
            raise ValueError(f"download.num_train_shards={self.num_train_shards} is more than {self.dataset} has: "
                             f"{spec.shards} shards, one of them the pinned val shard, leave at most {spec.last} "
                             f"for training (download.dataset={self.dataset})")
        return self

    @model_validator(mode="after")
    def _sources(self):
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"download.base_url={self.base_url!r} is not an http(s) URL; "
                "for a local folder of shards set download.source_dir instead"
            )
        if self.source_dir is not None and not self.source_dir.strip():
            raise ValueError("download.source_dir is empty; use null to download over HTTP")
        if not self.eval_bundle_url.strip():
            raise ValueError("download.eval_bundle_url is empty; give an http(s) URL, a local .zip or a bundle folder")
        return self

    @model_validator(mode="after")
    def _val_not_in_train(self):
        if self.val_index < self.num_train_shards:
            raise ValueError(
                f"download.val_shard={self.val_index} is also a training shard "
                f"(num_train_shards={self.num_train_shards} means shards 0..{self.num_train_shards - 1}); "
                f"pick a val_shard >= {self.num_train_shards} or fewer training shards"
            )
        return self


class TokenizerConfig(Section):
    """The defaults train in seconds on 2 cores; real runs (presets d12, d20): vocab 65536, 2e9 characters."""

    vocab_size: int = Field(4096, ge=256 + 9,  # 256 bytes + 9 special tokens at least
                            description="256 bytes + merges + 9 specials; 65536 (2^16) for real runs")
    max_chars: BigInt = Field(10_000_000, ge=1, description="train on the first N characters of the training "
                                                            "shards (2e9 for real runs: 8+ shards)")
    doc_cap: int = Field(10_000, ge=1, description="characters kept from each document")
    eval_chars: BigInt = Field(1_000_000, ge=1, description="held-out slice of the val shard for bytes/token "
                                                            "(1e7 for real runs)")


# train.recipe: the defaults of the options below it (each option's null = its recipe's value).
# 2025 = nanochat's FineWeb-era recipe (10231df), 2026 = nanochat HEAD's (92d63d4).
RECIPES: dict[str, dict[str, Any]] = {
    "2025": dict(value_embeds=False, window_pattern="L", lambdas=False, smear=False, backout=False, softcap=15.0,
                 init_scheme="2025", rope_base=10_000.0, qk_scale=1.0, muon_orthogonalize="newton_schulz",
                 normuon=False, muon_weight_decay=0.0, cautious_weight_decay=False, weight_decay_schedule="constant",
                 momentum_schedule="2025", adamw_groups="2025", scalar_lr=0.5, loader="stream",
                 embedding_lr=0.2, unembedding_lr=0.004, grad_clip=1.0, warmup_steps=0, warmdown_ratio=0.2,
                 final_lr_frac=0.0),
    "2026": dict(value_embeds=True, window_pattern="SSSL", lambdas=True, smear=True, backout=True, softcap=15.0,
                 init_scheme="2026", rope_base=100_000.0, qk_scale=1.2, muon_orthogonalize="polar_express",
                 normuon=True, muon_weight_decay=0.28, cautious_weight_decay=True, weight_decay_schedule="cosine",
                 momentum_schedule="2026", adamw_groups="2026", scalar_lr=0.5, loader="bestfit",
                 # HEAD's base_train.py argparse defaults; HEAD has no gradient clipping at all
                 embedding_lr=0.3, unembedding_lr=0.008, grad_clip=0.0, warmup_steps=40, warmdown_ratio=0.65,
                 final_lr_frac=0.05),
}
RECIPE_KEYS = tuple(RECIPES["2025"])
# the recipe options that are the model's (GPTConfig field names)
MODEL_OPTIONS = {"value_embeds": "value_embeds", "window_pattern": "window_pattern", "lambdas": "lambdas",
                 "smear": "smear", "backout": "backout", "softcap": "softcap", "init_scheme": "init",
                 "rope_base": "rope_base", "qk_scale": "qk_scale"}


class TrainConfig(Section):
    depth: int = Field(4, ge=1, le=MAX_DEPTH, description="the one dial: width 64*depth, heads ceil(width/128) "
                                                    "(head_dim 128), layers = depth")
    n_kv_head: int | None = Field(None, ge=1, description="GQA: key/value heads, must divide the query heads; "
                                                          "null = as many as the query heads")
    max_seq_len: int = Field(256, ge=8, description="context length T (nanochat: 2048)")
    device_batch_size: int = Field(8, ge=1, description="sequences per micro-step per process "
                                                        "(lower it if memory runs out)")
    total_batch_size: int = Field(4096, ge=1, description="tokens per optimizer step: device_batch * seq * world "
                                                          "* accumulation steps")
    # horizon, by precedence: explicit iterations > target FLOPs > tokens:params ratio
    num_iterations: int | None = Field(200, ge=1, description="horizon: explicit steps; null = from target_flops, "
                                                              "else from the ratio")
    target_flops: float | None = Field(None, gt=0, description="total training FLOPs (6N+attention per token), "
                                                               "used when num_iterations is null")
    target_param_data_ratio: float = Field(20.0, gt=0, description="tokens = ratio * params (Chinchilla), "
                                                                   "used when both above are null")
    matrix_lr: float = Field(0.02, gt=0, description="Muon, for every matrix inside the blocks")
    # the LR and schedule keys marked "recipe option": null = train.recipe's value (2025 | 2026)
    embedding_lr: float | None = Field(None, gt=0, description="AdamW, scaled by (width/768)^-0.5; recipe option "
                                                               "(2025: 0.2, 2026: 0.3)")
    unembedding_lr: float | None = Field(None, gt=0, description="AdamW for the LM head, scaled by (width/768)^-0.5; "
                                                                 "recipe option (2025: 0.004, 2026: 0.008)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (embedding and LM head)")
    grad_clip: float | None = Field(None, ge=0, description="max global grad norm, on the synchronised gradient; "
                                                            "0 disables; recipe option (2025: 1, 2026: 0 as HEAD)")
    # LR schedule: warmup, constant, linear warmdown to final_lr_frac
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps with linear LR warmup (the warmup "
                                                             "is the longer of this and warmup_steps)")
    warmup_steps: int | None = Field(None, ge=0, description="steps of linear LR warmup (HEAD's --warmup-steps); "
                                                             "recipe option (2025: 0, 2026: 40)")
    warmdown_ratio: float | None = Field(None, ge=0, le=1, description="fraction of steps at the end with linear LR "
                                         "decay to final_lr_frac; recipe option (2025: 0.2, 2026: 0.65)")
    final_lr_frac: float | None = Field(None, ge=0, le=1, description="LR multiplier reached at the last step; "
                                                                      "recipe option (2025: 0, 2026: 0.05)")
    device: Device = Field("auto", description="auto (cuda > mps > cpu) | cpu | cuda | mps")
    dtype: DType = Field("auto", description="auto (bf16 on CUDA; on CPU whichever of fp32/bf16 a ~1 s probe of "
                                             "this model measures faster, cached in ~/.cache/nanoforge/dtype_probe.json: "
                                             "delete it or set NANOFORGE_DTYPE_REPROBE=1 to measure again) "
                                             "| float32 | bfloat16")
    # YAML 1.1 tools read a bare on/off as a boolean: take those to mean the same
    compile: Annotated[
        Literal["auto", "on", "off"], BeforeValidator(lambda v: ("on" if v else "off") if isinstance(v, bool) else v)
    ] = Field("auto", description="torch.compile: auto (on for CUDA) | on | off (on CPU it needs a C++ compiler)")
    nproc_per_node: int = Field(1, ge=1, description="processes per node under torchrun (dvc.yaml's command)")
    shard_optimizer: bool = Field(True, description="with more than one rank: ZeRO-1, each rank keeps and "
                                  "steps the optimizer state of 1/world of the parameters, then broadcasts them "
                                  "(the same weights bit for bit; false: every rank steps everything)")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective (all-reduce, barrier) that waits "
                                        "longer fails the run: a frozen or lost node becomes an error, not a hang")
    seed: int = Field(42, description="model init and the data order of later epochs")
    loader: Literal["stream", "bestfit"] | None = Field(
        None, description="how documents become rows: stream = one token stream cut into rows (2025) | bestfit = "
                          "nanochat HEAD's BOS-aligned best-fit packing, every row starts at a document, ~1/3 of "
                          "the tokens cropped at T=2048 (2026); null = the recipe's")
    loader_buffer_docs: int = Field(1000, ge=1, description="bestfit: the documents it chooses from (nanochat: 1000)")
    fp8: bool = Field(False, description="fp8 matmuls in training (nanochat HEAD's tensorwise recipe) on GPUs with "
                                         "compute capability 8.9+ (H100/H200, L4/L40); elsewhere skipped with the "
                                         "reason in the log; evaluation stays in the run's dtype")
    eval_every: int = Field(50, ge=0, description="val BPB every N steps and at the end (0: off)")
    eval_tokens: BigInt = Field(32_768, ge=1, description="val BPB budget during training, from the start of "
                                                          "the val shard")
    sample_every: int = Field(100, ge=0, description="greedy samples in the log every N steps and at the end "
                                                     "(0: off)")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0: only at the end and on SIGTERM)")
    keep_checkpoints: int = Field(2, ge=1, description="keep the last K checkpoints")
    # the recipe: one switch, and each of its options (null = the recipe's value; set one to override it)
    recipe: Literal["2025", "2026"] = Field("2025", description="2025 = nanochat's FineWeb-era recipe (10231df); "
                                            "2026 = nanochat HEAD's (92d63d4): sets the defaults of the options "
                                            "below and of the LR/schedule keys marked recipe option above "
                                            "(HEAD's batch-size, LR and weight-decay scaling rules are not "
                                            "applied: set total_batch_size, the LRs and muon_weight_decay)")
    value_embeds: bool | None = Field(None, description="value embeddings on alternating layers, gated into v "
                                                        "(2025: false, 2026: true)")
    window_pattern: str | None = Field(None, description="sliding-window attention per layer, tiled: L = full "
                                       "context, S = a quarter of it (ceil to 128); last layer L (2025: L, 2026: SSSL)")
    lambdas: bool | None = Field(None, description="learned per-layer resid_lambdas and x0_lambdas "
                                                   "(2025: false, 2026: true)")
    smear: bool | None = Field(None, description="mix the previous token's embedding in, gated (2025: false, 2026: true)")
    backout: bool | None = Field(None, description="subtract a learned share of the mid-depth residual before the "
                                                   "head (2025: false, 2026: true)")
    softcap: float | None = Field(None, gt=0, description="logit softcap c: c*tanh(logits/c) (both recipes: 15)")
    init_scheme: Literal["2025", "2026"] | None = Field(None, description="weight init: 2025 normal by fan-in; 2026 "
                                                        "HEAD's uniform, embedding std 0.8, LM head std 0.001")
    rope_base: float | None = Field(None, gt=0, description="rotary base theta (2025: 10000, 2026: 100000)")
    qk_scale: float | None = Field(None, gt=0, description="q and k times this after QK norm (2025: 1, 2026: 1.2)")
    muon_orthogonalize: Literal["newton_schulz", "polar_express"] | None = Field(
        None, description="Muon's orthogonalisation: newton_schulz (quintic, 2025) | polar_express (HEAD: row "
                          "equilibration, Polar Express coefficients, Frobenius renormalisation; 2026)")
    normuon: bool | None = Field(None, description="NorMuon variance reduction after orthogonalisation, beta2 0.9 "
                                                   "(2025: false, 2026: true)")
    muon_weight_decay: float | None = Field(None, ge=0, description="Muon weight decay at step 0, as given (HEAD's "
                                            "--weight-decay, which HEAD also rescales by batch and horizon; "
                                            "2025: 0, 2026: 0.28)")
    cautious_weight_decay: bool | None = Field(None, description="decay only where update and weight agree in sign "
                                                                 "(2025: false, 2026: true)")
    weight_decay_schedule: Literal["constant", "cosine"] | None = Field(
        None, description="Muon weight decay over the run: constant | cosine to 0 at the end (2025: constant, "
                          "2026: cosine)")
    momentum_schedule: Literal["2025", "2026"] | None = Field(
        None, description="Muon momentum: 2025 0.85 -> 0.95 over 300 steps; 2026 0.85 -> 0.97 over 400, then "
                          "-> 0.90 over the LR warmdown")
    adamw_groups: Literal["2025", "2026"] | None = Field(
        None, description="AdamW betas/weight decay: 2025 (0.8, 0.95) and train.weight_decay for all; 2026 HEAD's "
                          "per group (LM head (0.8, 0.96) wd 0.01, embedding (0.8, 0.995) wd 0.001)")
    scalar_lr: float | None = Field(None, gt=0, description="AdamW for x0_lambdas (resid_lambdas: 0.01x) when "
                                                            "lambdas are on (both recipes: 0.5)")

    def option(self, name: str) -> Any:
        """A recipe option's value: as given, else its recipe's."""
        value = getattr(self, name)
        return RECIPES[self.recipe][name] if value is None else value

    def recipe_options(self) -> dict[str, Any]:
        return {name: self.option(name) for name in RECIPE_KEYS}

    def model_options(self) -> dict[str, Any]:
        """The recipe options that shape the model, as GPTConfig fields."""
        return {field: self.option(name) for name, field in MODEL_OPTIONS.items()}

    @model_validator(mode="after")
    def _consistent(self):
        if self.warmup_ratio + self.option("warmdown_ratio") > 1:
            raise ValueError(
                f"train.warmup_ratio ({self.warmup_ratio}) + train.warmdown_ratio ({self.option('warmdown_ratio')}) "
                "exceed 1: the schedule would have no room"
            )
        if self.window_pattern is not None and (not self.window_pattern or set(self.window_pattern.upper()) - set("SL")):
            raise ValueError(f"train.window_pattern={self.window_pattern!r}: use only S (short) and L (long), "
                             "e.g. SSSL")
        # the model's own rule (nanoforge/model/shape.py); the shape does not depend on the vocabulary
        width, n_head = width_and_heads(self.depth)
        try:
            config_for_depth(self.depth, vocab_size=VOCAB_MULTIPLE, sequence_len=self.max_seq_len)
        except ValueError as exc:
            ok = [d for d in range(max(1, self.depth - 4), min(MAX_DEPTH, self.depth + 4) + 1) if _depth_works(d)]
            raise ValueError(
                f"train.depth={self.depth} gives width {width} and {n_head} heads ({exc}); "
                f"nearby depths that work: {ok}"
            ) from None
        if self.n_kv_head is not None and (self.n_kv_head > n_head or n_head % self.n_kv_head):
            raise ValueError(
                f"train.n_kv_head={self.n_kv_head} must divide the {n_head} query heads of depth {self.depth}"
            )
        self.batch_geometry(
            self.total_batch_size, self.device_batch_size, self.max_seq_len, self.nproc_per_node, "train.nproc_per_node"
        )
        return self

    @staticmethod
    def batch_geometry(total_batch: int, device_batch: int, seq_len: int, world_size: int, world_name: str = "world size") -> int:
        """Gradient accumulation steps, or a ValueError naming the numbers and the nearest valid values."""
        per_micro = device_batch * seq_len * world_size
        if total_batch >= per_micro and total_batch % per_micro == 0:
            return total_batch // per_micro
        lower = (total_batch // per_micro) * per_micro
        near = " or ".join(str(v) for v in (lower, lower + per_micro) if v > 0)
        fits = [b for b in range(1, device_batch + 1) if total_batch % (b * seq_len * world_size) == 0]
        alt = f", or device_batch_size {fits[-1]}" if fits else ""
        raise ValueError(
            f"train.total_batch_size={total_batch} is not a multiple of train.device_batch_size ({device_batch}) "
            f"x train.max_seq_len ({seq_len}) x {world_name} ({world_size}) = {per_micro} tokens per micro-step; "
            f"nearest valid total_batch_size: {near}{alt}"
        )


def _depth_works(depth: int) -> bool:
    try:
        config_for_depth(depth, vocab_size=VOCAB_MULTIPLE, sequence_len=8)
    except ValueError:
        return False
    return True


class EvaluateConfig(Section):
    val_tokens: BigInt = Field(65_536, ge=1, description="BPB budget, from the start of the val shard and of the "
                                                         "train shards (nanochat: 20*524288)")
    device_batch_size: int = Field(8, ge=1, description="rows per forward pass (CORE packs up to this many "
                                                        "context-lengths of tokens)")
    core_max_per_task: int | None = Field(100, ge=1, description="null = every item of every task "
                                                                 "(nanochat's leaderboard numbers)")
    core_tasks: list[str] | None = Field(None, description="null = every task in core.yaml, or a list of labels")
    skip_bad_tasks: bool = Field(False, description="a bad task in the bundle: false = stop with an error, "
                                                    "true = skip it with a warning")
    device: Device = Field("auto", description="auto | cpu | cuda | mps")
    dtype: DType = Field("auto", description="auto (as train.dtype: bf16 on CUDA, on CPU the faster one measured "
                                             "for this model's forward; NANOFORGE_DTYPE_REPROBE=1 measures again) "
                                             "| float32 | bfloat16")
    nproc_per_node: int = Field(1, ge=1, description="processes under torchrun (items and BPB rows are split "
                                                     "over them)")
    collective_timeout_s: float = Field(600.0, gt=0, description="a collective that waits longer fails the "
                                        "run: a frozen or lost node becomes an error, not a hang")
    sample_prompts: list[str] = Field([
        "The capital of France is",
        "The chemical symbol of gold is",
        "If yesterday was Friday, then tomorrow will be",
        "The opposite of hot is",
        "The planets of the solar system are:",
    ], description="greedy continuations saved for the report")
    sample_max_tokens: int = Field(32, ge=1, description="tokens per sample")
    num_unconditioned_samples: int = Field(3, ge=0, description="free samples from BOS alone")
    temperature: float = Field(1.0, gt=0, description="for the unconditioned samples (the prompts are greedy)")
    seed: int = Field(42, description="for the unconditioned samples")


class ReportConfig(Section):
    gpu_hourly_usd: dict[str, float] = Field(
        {"H100": 2.49, "H200": 3.49, "A100": 1.79, "L4": 0.8},
        description="USD per GPU-hour for the cost estimate; key = part of the GPU's name")
    cpu_hourly_usd: float = Field(0.05, ge=0, description="USD per hour for a CPU-only machine")
    compare_runs: int = Field(5, ge=0, le=100, description="earlier train runs (MLflow) to compare against; 0: none")
    champion: str = Field("nanoforge-base@champion", description="registered model@alias to compare against "
                                                                 "(name = pipeline.registered_model)")

    @model_validator(mode="after")
    def _valid(self):
        bad = {k: v for k, v in self.gpu_hourly_usd.items() if v < 0 or not k.strip()}
        if bad:
            raise ValueError(f"report.gpu_hourly_usd: prices must be >= 0 with a GPU name as key (got {bad})")
        name, at, alias = self.champion.partition("@")
        if not (name.strip() and at and alias.strip()):
            raise ValueError(f"report.champion={self.champion!r}: expected 'model_name@alias', e.g. 'nanoforge-base@champion'")
        return self


class PipelineConfig(Section):
    NOTE = "read by pipelines/ (Dagster), not by a DVC stage"

    nightly_cron: str = Field("0 3 * * *", description="the nightly retrain (5-field cron); "
                                                       "`make ui` needs 'Reload definitions' after an edit")
    timezone: str = Field("UTC", description="of nightly_cron (IANA name)")
    min_bytes_per_token: float = Field(3.0, gt=0, description="tokenizer asset check")
    bpb_tolerance: float = Field(0.02, ge=0, description="val BPB may be this much worse than the champion "
                                                         "(warning)")
    registered_model: str = Field("nanoforge-base", min_length=1, description="the MLflow registered model")
    push_to_remote: bool = Field(True, description="nightly: dvc push after a successful run")
    alert_webhook_url: str | None = Field(None, description="POSTed a JSON alert when a run fails; null: none")

    @model_validator(mode="after")
    def _schedule(self):
        # checked here so a typo fails `dagster definitions validate` with the key's name
        fields = self.nightly_cron.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9*/,\-A-Za-z?]+", f) for f in fields):
            raise ValueError(f"pipeline.nightly_cron={self.nightly_cron!r} is not a 5-field cron string "
                             "(minute hour day month weekday), e.g. '0 3 * * *'")
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(self.timezone)
        except Exception:
            raise ValueError(f"pipeline.timezone={self.timezone!r} is not an IANA timezone (e.g. UTC, Europe/Paris)") from None
        if self.alert_webhook_url is not None and not self.alert_webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"pipeline.alert_webhook_url={self.alert_webhook_url!r} must be an http(s) URL or null")
        return self


# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
_SLURM_TIME = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE",
                         re.IGNORECASE)


class LaunchConfig(Section):
    NOTE = "how train and evaluate run (python -m nanoforge.launch, dvc.yaml's command): here, or as a Slurm job"

    launcher: Literal["local", "slurm"] = Field("local", description="local = torchrun --standalone on this "
                                                                     "machine | slurm = sbatch a job, wait for it")
    nodes: int = Field(1, ge=1, description="nodes of the Slurm job, one torchrun agent on each (local: 1)")
    tasks_per_node: int | None = Field(None, ge=1, description="processes per node; null = the stage's "
                                                               "nproc_per_node")
    gpus_per_node: int = Field(0, ge=0, description="GPUs asked of Slurm per node (--gpus-per-node); 0 on CPU")
    partition: str | None = Field(None, description="Slurm partition (checked with sinfo); null = the cluster's "
                                                    "default")
    account: str | None = Field(None, description="Slurm account to charge; null = your default")
    time_limit: str | None = Field(None, description="Slurm --time, e.g. 30, 4:00:00 or 1-12:00:00; null = the "
                                                     "partition's limit")
    sbatch_options: list[str] = Field([], description="extra sbatch flags, one per item, e.g. --qos=high, "
                                                      "--cpus-per-task=16")
    rdzv_port: int = Field(29500, ge=1, le=65535, description="c10d rendezvous port on the job's first node")

    @model_validator(mode="after")
    def _valid(self):
        if self.launcher == "local" and self.nodes != 1:
            raise ValueError(f"launch.nodes={self.nodes} needs launch.launcher: slurm (local runs on one node)")
        if self.time_limit is not None and not _SLURM_TIME.fullmatch(self.time_limit.strip()):
            raise ValueError(f"launch.time_limit={self.time_limit!r} is not a Slurm time: minutes, HH:MM:SS "
                             "or D-HH:MM:SS, e.g. '4:00:00'")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ValueError(f"launch.{key}={value!r}: give one name, or null for the default")
        bad = [o for o in self.sbatch_options if not o.startswith("-") or "\n" in o]
        if bad:
            raise ValueError(f"launch.sbatch_options: each item is one sbatch flag starting with '-' "
                             f"(e.g. --qos=high), got {bad}")
        return self


def budget_label(budget: float) -> str:
    """1e15 -> '1e15', 2.15e18 -> '2.15e18': the shortest scientific form that keeps 6 digits
    (a sweep cell's name, nanoforge/sweep/grid.py; here so the config needs no sweep import)."""
    mantissa, exponent = f"{float(budget):.5e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _budget_text(value: Any) -> Any:
    # DVC names a matrix stage from each value's text (sweep@1e15-4); a YAML float would print as
    # 1000000000000000.0, so a budget is the quoted shortest scientific form, '1e15' or '2.15e18'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"write the budget {value!r} as the quoted string '{budget_label(value)}': "
                         "DVC names each cell's stage from this text")
    return value


class SweepConfig(Section):
    NOTE = ("the scaling-law sweep (sweep/dvc.yaml: a cell stage per budget x depth, then scaling_laws): every cell "
            "trains the train section's recipe at one depth to exactly one budget (train.target_flops)")

    budgets: list[Annotated[str, BeforeValidator(_budget_text)]] = Field(
        ["3e12", "1e13", "3e13"], description="compute budgets C in training FLOPs, quoted, shortest scientific form")
    depths: list[int] = Field([1, 2, 3, 4], description="model depths per budget (at least 3: a parabola each); "
                                                         "5 has no shape (width 320, 3 heads)")
    core: bool = Field(False, description="also the CORE metric per cell: not yet (val BPB is the sweep's metric)")
    params_convention: Literal["total", "no_embedding", "transformer"] = Field(
        "no_embedding", description="what counts as N in the fit (nanochat's notebook: no_embedding)")
    min_steps: int = Field(10, ge=1, description="a cell with fewer optimizer steps is refused before any work")
    bootstrap: int = Field(1000, ge=0, description="bootstrap replicates for the uncertainty of a, b, D/N (0: off)")
    seed: int = Field(0, description="of the bootstrap")
    sum_tolerance: float = Field(0.1, gt=0, description="asset check: |a + b - 1| at most this")

    @model_validator(mode="after")
    def _valid(self):
        if self.core:  # refused rather than ignored: the evaluate stage reads artifacts/model, not a cell's model
            raise ValueError("sweep.core: true is not supported yet: the cells are compared on val BPB; "
                             "run the evaluate stage on a cell's model by hand for its CORE")
        for text in self.budgets:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"sweep.budgets: {text!r} is not a number of FLOPs, e.g. '1e15'") from None
            if not (0 < value < float("inf")):
                raise ValueError(f"sweep.budgets: {text!r} must be positive finite FLOPs")
            if budget_label(value) != text:
                raise ValueError(f"sweep.budgets: write {text!r} as '{budget_label(value)}' (the cell names "
                                 "artifacts/sweep/c<budget>-d<depth> use that form)")
        return self


class Params(Section):
    download: DownloadConfig = DownloadConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    pipeline: PipelineConfig = PipelineConfig()
    launch: LaunchConfig = LaunchConfig()
    sweep: SweepConfig = SweepConfig()


SECTIONS = tuple(Params.model_fields)


# ---------------------------------------------------------------------------
# YAML: PyYAML speaks YAML 1.1, where `1e-3` is a string and `on`/`yes` are booleans.
# DVC (ruamel) speaks 1.2, where `1e-3` is a float and `on` a string. Teach our loader
# 1.2's floats and booleans so both read a file alike.

class _Loader(yaml.SafeLoader):
    pass


_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rules if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for ch, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_12, list("tTfF"))
# ints win over floats for plain digits: re-add int after float so "42" stays int
_Loader.yaml_implicit_resolvers = {
    k: sorted(v, key=lambda tr: tr[0] != "tag:yaml.org,2002:int") for k, v in _Loader.yaml_implicit_resolvers.items()
}


class DuplicateKeyError(ConfigError, yaml.YAMLError):
    """A key given twice in one mapping: PyYAML would keep the last, DVC refuses the file."""


def _refuse_duplicate_keys(node: yaml.Node, path: tuple[str, ...] = ()) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                line = key.start_mark.line + 1
                if name in seen:
                    dotted = ".".join((*path, name))
                    raise DuplicateKeyError(
                        f"{dotted} is given twice (lines {seen[name]} and {line}); DVC refuses such a file "
                        f"and a YAML reader keeps only the last: delete one of them")
                seen[name] = line
            _refuse_duplicate_keys(value, (*path, str(name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, (*path, str(i)))


def parse_yaml(text: str) -> Any:
    """YAML as DVC reads it (1.2 floats and booleans); a duplicate key raises DuplicateKeyError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------
# loading and overrides

def _format_errors(err: ValidationError, where: str, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            model = Params
            for part in loc[:-1]:
                field = model.model_fields.get(part)
                model = field.annotation if field is not None and isinstance(field.annotation, type) else None
                if model is None or not issubclass(model, BaseModel):
                    model = None
                    break
            known = list(model.model_fields) if model else []
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            reason = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(known)})")
        elif e["type"] == "value_error":
            reason = str(e.get("ctx", {}).get("error", e["msg"]))
            if reason.startswith(key + ".") or not loc:  # the message already names its keys
                lines.append(f"  {reason}")
                continue
        else:
            reason = f"{e['msg'].lower()} (got {e['input']!r})" if "input" in e else e["msg"].lower()
        lines.append(f"  {key}: {reason}")
    return f"{where}: invalid config\n" + "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str, section: str | None = None) -> tuple[str, Any]:
    """'depth=6' or 'train.depth=6' -> ('train.depth', 6). Values are YAML scalars."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value")
    if section is not None and key.split(".")[0] != section:
        if key.split(".")[0] in SECTIONS:
            raise ConfigError(f"--set {key}: this is the '{section}' stage; it cannot override '{key.split('.')[0]}'")
        key = f"{section}.{key}"
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


RESTORE = "python -m nanoforge.presets tiny writes a complete one (or d12, d20)"


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = (), section: str | None = None) -> Params:
    """Read, override and validate params.yaml. Raises ConfigError naming every bad key.

    `section` is the one the caller reads: it must be in the file (an empty file or a deleted
    section would otherwise run silently on the built-in defaults); `--set` overrides change a
    file, they cannot stand in for one.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the repo root, or pass --params)")
    try:
        raw = parse_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"{path}: empty; every stage reads its section from it, so nothing would be "
                          f"configured ({RESTORE})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if section is not None:
        if section not in raw:
            raise ConfigError(f"{path}: no '{section}:' section, which this stage reads; restore it rather than "
                              f"run on built-in defaults ({RESTORE})")
        if not raw[section]:
            raise ConfigError(f"{path}: the '{section}:' section is empty; give its keys "
                              f"rather than run on built-in defaults ({RESTORE})")
    for item in overrides:
        key, value = parse_override(item, section)
        _set_path(raw, key, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        where = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
        raise ConfigError(_format_errors(err, where, raw)) from None


def to_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values. For MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------
# the stage CLI: every stage takes --params and --set, and prints what it resolved

# the section each stage reads, where it is not named after the stage
STAGE_SECTION = {"register": "pipeline"}


def stage_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """--params and --set; the description (a stage's docstring) is shown as written, bullets and all."""
    section = STAGE_SECTION.get(stage, stage)
    article = "an" if section[:1] in "aeiou" else "a"
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=textwrap.dedent(description).strip() if description else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override {article} {section} param for this run, e.g. --set key=value (repeatable)",
    )
    return parser


def resolve(stage: str, args: argparse.Namespace, quiet: bool = False) -> Params:
    """Validate params.yaml + overrides for `stage`; print the stage's resolved section."""
    params = load_params(args.params, args.overrides, section=stage)
    if not quiet:
        print(f"[{stage}] resolved config:\n" + _indent(to_yaml(getattr(params, stage))), flush=True)
    return params


def _indent(text: str) -> str:
    return "".join("  " + line for line in text.splitlines(keepends=True))
