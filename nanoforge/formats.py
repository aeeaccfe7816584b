"""Numbers for people, once: every human view formats a quantity the same way.

The report, the Dagster metadata, the demo's table and the terminal all call
`human(key, value)` (text) or `for_dagster(key, value)` (a rounded number for the UI's
charts), so MFU reads "0.69%" everywhere and val BPB has four decimals everywhere.
Machine files (metrics.json, CSVs, MLflow) keep full precision: only views round.

Notable:
- The kind of a quantity comes from its name (`*_bpb`, `*_seconds`, `mfu`, ...), so a
  new metric formats sensibly without being listed.
- MFU is stored as a fraction of the device's peak; people read it as a percentage,
  so Dagster shows it as `mfu_percent` (the unit in the name: metadata has no unit field).
- Every BPB figure is shown with its token budget (`budget()`): the training loop's
  estimate (train.eval_tokens) and the evaluate stage's (evaluate.val_tokens) differ.
"""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"

def finite(x: Any) -> float | None:
    """A finite float, or None for anything else (None, bools, text, NaN, inf)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def count(x: Any) -> str:
    """An integer with thousands separators: 1,234,567."""
    value = finite(x)
    return NA if value is None else f"{round(value):,}"


def sig(x: Any, digits: int = 4) -> str:
    """A metric to `digits` significant digits; large values keep all integer digits (12,346)."""
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    value = finite(x)
    if value is None:
        return NA
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 15 or magnitude < -4:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:,.{decimals}f}"
    return text


def signed(x: Any, digits: int = 4) -> str:
    value = finite(x)
    if value is None:
        return NA
    return ("+" if value > 0 else "") + sig(value, digits)


def si(x: Any, unit: str = "", digits: int = 4) -> str:
    """1.234e15 -> '1.234 P<unit>'."""
    value = finite(x)
    if value is None:
        return NA
    prefixes = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{sig(value / scale, digits)} {prefix}{unit}"
    return f"{sig(value, digits)} {unit}".rstrip()


def nbytes(x: Any) -> str:
    """Binary units, as memory is sold: 23.54 GiB."""
    value = finite(x)
    if value is None:
        return NA
    for scale, unit in [(2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]:
        if abs(value) >= scale:
            return f"{sig(value / scale)} {unit}"
    return f"{count(value)} B"


def duration(seconds: Any) -> str:
    """42.1s, 2m 05s, 1h 02m 03s, 3d 04h 05m."""
    value = finite(seconds)
    if value is None:
        return NA
    if value < 60:
        return f"{value:.1f}s"
    total = round(value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def percent(fraction: Any) -> str:
    """A fraction as a percentage with two decimals (0.006943 -> 0.69%); tiny ones keep two significant digits."""
    value = finite(fraction)
    if value is None:
        return NA
    pct = 100 * value
    return f"{sig(pct, 2)}%" if pct != 0 and abs(pct) < 0.01 else f"{pct:,.2f}%"


def usd(x: Any) -> str:
    """Dollars as people write them: $1,234.50, $2.49, $0.0517, $0.05."""
    value = finite(x)
    if value is None:
        return NA
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) < 1e-4:  # a tiny CPU run: pennies are not worth scientific notation
        return "$0" if value == 0 else "< $0.0001"
    return f"${value:.3g}"

# ---------------------------------------------------------------------------
# one format per quantity

# name -> kind; names not listed get their kind from their suffix (kind_of)
KINDS = {
    "core": "core", "mfu": "fraction", "tok_per_sec": "rate", "num_params": "si", "tokens_trained": "si",
    "num_flops_per_token": "si", "final_loss": "loss", "loss": "loss", "loss_ema": "loss",
}
# what a person calls each headline quantity, with its unit where it has one
LABELS = {
    "val_bpb": "val BPB (bits/byte)", "train_bpb": "train BPB (bits/byte)", "min_val_bpb": "min val BPB (bits/byte)",
    "core": "CORE", "final_loss": "final loss (EMA, nats/token)", "tok_per_sec": "tok/s", "mfu": "MFU (% of peak)",
    "train_seconds": "train time", "num_params": "params", "tokens_trained": "tokens trained", "cost_usd": "cost (USD)",
}


def kind_of(key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    if name in KINDS:
        return KINDS[name]
    for suffix, kind in (("_bpb", "bpb"), ("_core", "core"), ("_loss", "loss"), ("_seconds", "seconds"),
                         ("_s", "seconds"), ("_usd", "usd"), ("_tokens", "count"), ("_mfu", "fraction"),
                         ("_percent", "percent")):
        if name.endswith(suffix):
            return kind
    return "number"


def human(key: str, value: Any) -> str:
    """`value` of quantity `key` as text for people: 2.3357, 0.69%, 8,123, 7.340 M, 1h 02m 05s, $0.05."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    kind = kind_of(key)
    if kind == "number" and isinstance(value, int):  # counts, versions, sizes: exact, with separators
        return count(value)
    value = finite(value) if kind != "number" else value
    if value is None:
        return NA
    if kind in ("bpb", "core", "loss"):
        return f"{value:.4f}"
    if kind == "fraction":
        return percent(value)
    if kind == "percent":  # already in percent (Dagster's mfu_percent)
        return percent(value / 100)
    if kind in ("rate", "count"):
        return count(value)
    if kind == "si":
        return si(value)
    if kind == "seconds":
        return duration(value)
    if kind == "usd":
        return usd(value)
    return sig(value)


def rounded(key: str, value: float) -> float:
    """The number `human` shows, still a number (charts need one); full precision stays in the files."""
    kind = kind_of(key)
    if kind in ("bpb", "core", "loss", "usd"):
        return round(value, 4)
    if kind == "fraction":
        return round(100 * value, 2)
    if kind == "percent":
        return round(value, 2)
    if kind in ("rate", "count", "si"):
        return float(round(value))
    if kind == "seconds":
        return round(value, 1)
    if value == 0:
        return 0.0
    return round(value, 3 - math.floor(math.log10(abs(value))))  # four significant digits


def for_dagster(key: str, value: Any) -> tuple[str, Any]:
    """(metadata key, value) for the Dagster UI: floats rounded like `human`; MFU as `mfu_percent`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return key, value
    if kind_of(key) == "fraction":
        return f"{key}_percent", rounded(key, value)
    if isinstance(value, int):
        return key, value
    number = rounded(key, value)
    return key, int(number) if kind_of(key) in ("rate", "count", "si") else number


def budget(tokens: Any, setting: str) -> str:
    """Which tokens a BPB figure is over: '65,536 tokens, evaluate.val_tokens'."""
    return f"{count(tokens)} tokens, {setting}" if finite(tokens) is not None else setting
