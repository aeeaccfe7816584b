"""params.yaml, typed and validated: one pydantic model per stage section.

Notable:
- One file holds every knob (`params.yaml`); DVC reads it as params, the stages
  read it here. The defaults below are the tiny CPU preset, the same values the
  repo's params.yaml spells out.
- Bad config fails before any work, naming the key and the reason: unknown keys
  (with a did-you-mean), wrong types (strict: "4" is not an int), ranges, and
  cross-field consistency.
- `--set key=value` overrides go through the same validation. Values are parsed
  as YAML 1.2 scalars, so `1e-3` is a float and `null` is None.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")
LAST_SHARD = 1822  # karpathy/fineweb-edu-100b-shuffle has shards 0..1822


class ConfigError(ValueError):
    """A bad params.yaml or --set override. The message names the key and the reason."""


def _integral(value: Any) -> Any:
    # Lets `max_chars: 2e9` mean an int, which YAML can only spell as a float.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


BigInt = Annotated[int, BeforeValidator(_integral)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DownloadConfig(Section):
    num_train_shards: int = Field(2, ge=1, le=LAST_SHARD)  # training shards are 0..n-1
    val_shard: int = Field(LAST_SHARD, ge=0, le=LAST_SHARD)  # pinned, never "the last file"
    # HF_ENDPOINT (if set) replaces https://huggingface.co here; NANOFORGE_MIRROR replaces both sources
    base_url: str = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    source_dir: str | None = None  # a local folder of shard_XXXXX.parquet, copied instead of HTTP
    eval_bundle_url: str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # or a .zip / folder
    workers: int = Field(4, ge=1, le=64)
    max_retries: int = Field(5, ge=0, le=50)
    timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _sources(self):
        if not self.base_url.startswith(("http://", "https://")):
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
        if self.val_shard < self.num_train_shards:
            raise ValueError(
                f"download.val_shard={self.val_shard} is also a training shard "
                f"(num_train_shards={self.num_train_shards} means shards 0..{self.num_train_shards - 1}); "
                f"pick a val_shard >= {self.num_train_shards} or fewer training shards"
            )
        return self


class TokenizerConfig(Section):
    """Tiny preset: trains in seconds on 2 cores. Real runs: vocab_size 65536, max_chars 2e9, eval_chars 1e7."""

    vocab_size: int = Field(4096, ge=256 + 9)  # 256 bytes + 9 special tokens at least
    max_chars: BigInt = Field(10_000_000, ge=1)  # stop training after this many characters
    doc_cap: int = Field(10_000, ge=1)  # characters kept from each document
    eval_chars: BigInt = Field(1_000_000, ge=1)  # held-out slice of the val shard for compression


class TrainConfig(Section):
    # the one dial
    depth: int = Field(4, ge=1, le=128)
    n_kv_head: int | None = Field(None, ge=1)  # GQA; None = as many as query heads
    max_seq_len: int = Field(256, ge=8)
    # batch arithmetic: total tokens per step = device_batch * seq * world * accumulation
    device_batch_size: int = Field(8, ge=1)
    total_batch_size: int = Field(4096, ge=1)
    # horizon, by precedence: explicit iterations > target FLOPs > tokens:params ratio
    num_iterations: int | None = Field(200, ge=1)
    target_flops: float | None = Field(None, gt=0)
    target_param_data_ratio: float = Field(20.0, gt=0)
    # optimizer
    matrix_lr: float = Field(0.02, gt=0)  # Muon
    embedding_lr: float = Field(0.2, gt=0)  # AdamW, scaled by (width/768)^-0.5
    unembedding_lr: float = Field(0.004, gt=0)  # AdamW, scaled by (width/768)^-0.5
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables
    # LR schedule: warmup, constant, linear warmdown to final_lr_frac
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmdown_ratio: float = Field(0.2, ge=0, le=1)
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    # hardware
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # YAML 1.1 (PyYAML) reads a bare on/off as a boolean: take those to mean the same
    compile: Annotated[
        Literal["auto", "on", "off"], BeforeValidator(lambda v: ("on" if v else "off") if isinstance(v, bool) else v)
    ] = "auto"
    nproc_per_node: int = Field(1, ge=1)  # used by dvc.yaml's torchrun command
    seed: int = 42
    # cadence (steps); 0 disables
    eval_every: int = Field(50, ge=0)
    eval_tokens: BigInt = Field(32_768, ge=1)
    sample_every: int = Field(100, ge=0)
    save_every: int = Field(50, ge=0)
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise ValueError(
                f"train.warmup_ratio ({self.warmup_ratio}) + train.warmdown_ratio ({self.warmdown_ratio}) "
                "exceed 1: the schedule would have no room"
            )
        width = 64 * self.depth
        n_head = -(-width // 128)
        if width % n_head or (width // n_head) % 2:
            ok = [d for d in range(max(1, self.depth - 4), self.depth + 5) if (64 * d) % -(-64 * d // 128) == 0]
            raise ValueError(
                f"train.depth={self.depth} gives width {width} and {n_head} heads, which do not divide evenly; "
                f"nearby depths that work: {ok}"
            )
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


class EvaluateConfig(Section):
    val_tokens: BigInt = Field(65_536, ge=1)  # BPB budget (val and train), from the start of each split
    device_batch_size: int = Field(8, ge=1)  # rows per forward (CORE: rows * context tokens)
    core_max_per_task: int | None = Field(100, ge=1)  # None = every item
    core_tasks: list[str] | None = None  # None = every task in core.yaml
    skip_bad_tasks: bool = False  # a bad task in the bundle: False = stop with an error, True = skip it and warn
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    nproc_per_node: int = Field(1, ge=1)  # used by dvc.yaml's torchrun command
    sample_prompts: list[str] = [
        "The capital of France is",
        "The chemical symbol of gold is",
        "If yesterday was Friday, then tomorrow will be",
        "The opposite of hot is",
        "The planets of the solar system are:",
    ]
    sample_max_tokens: int = Field(32, ge=1)
    num_unconditioned_samples: int = Field(3, ge=0)
    temperature: float = Field(1.0, gt=0)
    seed: int = 42


class ReportConfig(Section):
    # USD per GPU-hour, matched as a substring of the GPU's name ("NVIDIA H100 80GB HBM3" -> H100)
    gpu_hourly_usd: dict[str, float] = {"H100": 2.49, "H200": 3.49, "A100": 1.79, "L4": 0.8}
    cpu_hourly_usd: float = Field(0.05, ge=0)  # USD per hour for a CPU-only machine
    compare_runs: int = Field(5, ge=0, le=100)  # earlier train runs to compare against
    champion: str = "nanoforge-base@champion"  # registered model @ alias; name as pipeline.registered_model

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
    """Orchestration knobs read by pipelines/ (Dagster), not by a DVC stage."""

    nightly_cron: str = "0 3 * * *"
    timezone: str = "UTC"
    min_bytes_per_token: float = Field(3.0, gt=0)  # tokenizer asset check threshold
    bpb_tolerance: float = Field(0.02, ge=0)  # val BPB may be this much worse than the champion (warning)
    registered_model: str = Field("nanoforge-base", min_length=1)
    push_to_remote: bool = True
    alert_webhook_url: str | None = None

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


class Params(Section):
    download: DownloadConfig = DownloadConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    pipeline: PipelineConfig = PipelineConfig()


SECTIONS = tuple(Params.model_fields)


# ---------------------------------------------------------------------------
# YAML: PyYAML speaks YAML 1.1, where `1e-3` is a string. DVC (ruamel) speaks
# 1.2, where it is a float. Teach our loader the 1.2 float so both agree.

class _Loader(yaml.SafeLoader):
    pass


_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in list("-+.0123456789"):
    _Loader.yaml_implicit_resolvers.setdefault(_ch, [])
    _Loader.yaml_implicit_resolvers[_ch] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers[_ch] if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))
# ints win over floats for plain digits: re-add int after float so "42" stays int
_Loader.yaml_implicit_resolvers = {
    k: sorted(v, key=lambda tr: tr[0] != "tag:yaml.org,2002:int") for k, v in _Loader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = (), section: str | None = None) -> Params:
    """Read, override and validate params.yaml. Raises ConfigError naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the repo root, or pass --params)")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
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

def stage_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a {stage} param for this run, e.g. --set key=value (repeatable)",
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
