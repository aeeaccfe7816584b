"""`dtype: auto` on a CPU: the probe picks what it measures faster, caches it per key, and stays short.

The timings are injected through `probe_dtype`'s `measure` argument (the seam), so the
choice and the cache are checked without depending on this machine's speed; one test
runs the real probe (the stage's model, one block, both dtypes) on this CPU.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from nanoforge.runtime import (
    BF16_MARGIN, DTYPE_CACHE, REPROBE_ENV, ProbeShape, describe_probe, pick_dtype_probed, probe_details, probe_dtype,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(REPROBE_ENV, raising=False)
    return tmp_path


class Timings:
    """A `measure` that returns fixed ms per dtype and counts its calls."""

    def __init__(self, fp32: float, bf16: float):
        self.ms, self.calls = {"float32": fp32, "bfloat16": bf16}, 0

    def __call__(self, shape):
        self.calls += 1
        return {**self.ms, "rows": shape.batch, "workload": "block"}


@pytest.mark.parametrize("fp32, bf16, expected", [
    (100.0, 40.0, "bfloat16"),  # bf16 faster
    (40.0, 100.0, "float32"),  # bf16 slower: the AMX Xeon case, where the bare matmul said otherwise
    (100.0, 100.0 * BF16_MARGIN + 0.5, "float32"),  # a near-tie keeps the precise one
])
def test_choice_follows_the_faster_measured_timing(fp32, bf16, expected):
    probe = probe_dtype(ProbeShape(), Timings(fp32, bf16))
    assert probe["choice"] == expected
    assert probe["ms_per_step"] == {"float32": fp32, "bfloat16": bf16}
    assert probe["cached"] is False
    dtype, record = pick_dtype_probed("auto", torch.device("cpu"), ProbeShape(batch=3), Timings(fp32, bf16))
    assert dtype == getattr(torch, expected) and record["choice"] == expected
    line = describe_probe(record)
    assert line.startswith(f"dtype auto: {expected} (probe: ") and DTYPE_CACHE in line


def test_cache_is_reused_and_keyed(cache_dir):
    measure = Timings(100.0, 40.0)
    first = probe_dtype(ProbeShape(), measure)
    second = probe_dtype(ProbeShape(), measure)
    assert measure.calls == 1, "the second call re-measured instead of reading the cache"
    assert second["cached"] is True and second["choice"] == first["choice"] == "bfloat16"
    assert json.loads((cache_dir / DTYPE_CACHE).read_text())  # on disk, one entry

    probe_dtype(ProbeShape(batch=4), measure)  # another device batch: another measurement
    probe_dtype(ProbeShape(train=False), measure)  # evaluation (forward only) is its own entry
    assert measure.calls == 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)  # another thread count: measured again
        probe_dtype(ProbeShape(), measure)
        assert measure.calls == 4
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((cache_dir / DTYPE_CACHE).read_text())) == 4


def test_reprobe_env_and_deleted_cache_measure_again(cache_dir, monkeypatch):
    measure = Timings(100.0, 40.0)
    probe_dtype(ProbeShape(), measure)
    measure.ms = {"float32": 40.0, "bfloat16": 100.0}  # the machine changed (a new torch, a BIOS setting)
    monkeypatch.setenv(REPROBE_ENV, "1")
    assert probe_dtype(ProbeShape(), measure)["choice"] == "float32" and measure.calls == 2
    monkeypatch.delenv(REPROBE_ENV)
    assert probe_dtype(ProbeShape(), measure)["cached"] is True  # the new figure replaced the old one
    (cache_dir / DTYPE_CACHE).unlink()
    probe_dtype(ProbeShape(), measure)
    assert measure.calls == 3


def test_explicit_dtypes_and_other_devices_do_not_probe():
    measure = Timings(1.0, 1.0)
    assert pick_dtype_probed("float32", torch.device("cpu"), None, measure) == (torch.float32, None)
    assert pick_dtype_probed("bfloat16", torch.device("cpu"), None, measure) == (torch.bfloat16, None)
    assert pick_dtype_probed("auto", torch.device("mps"), None, measure) == (torch.float32, None)
    assert measure.calls == 0 and probe_details(None) is None


def test_shape_from_the_model_config():
    from nanoforge.model.shape import config_for_depth

    config = config_for_depth(4, 4096, 256)
    shape = ProbeShape.of(config, 8)
    assert shape == ProbeShape()  # the defaults are the tiny preset's shape
    assert ProbeShape.of(config.to_dict(), 8, train=False) == ProbeShape(train=False)  # a model's config.json
    assert ProbeShape.of(config_for_depth(6, 4096, 256), 8).key() != shape.key()  # depth sets the width


def test_real_probe_returns_a_dtype_within_its_budget():
    """The real thing on this CPU, at the tiny preset's shape: one of the two dtypes, numbers recorded, short."""
    t0 = time.perf_counter()
    probe = probe_dtype(ProbeShape())
    seconds = time.perf_counter() - t0
    assert probe["choice"] in ("float32", "bfloat16")
    assert all(ms > 0 for ms in probe["ms_per_step"].values())
    assert probe["workload"] in ("matmul", "block")
    # ~0.6 s on this 2-core AVX2 box (bf16 emulated: decided by the matmul); generous for a loaded one
    assert seconds < 20, f"the probe took {seconds:.1f} s"
    assert set(probe_details(probe)) >= {"choice", "ms_per_step", "workload", "shape"}
