"""benchmarks.recovery: the block-wise row's budget (the tokens that take the KD run's wall time) and each row's verdict."""
import argparse
from types import SimpleNamespace

import pytest

from benchmarks import recovery as bench


def test_the_block_budget_separates_the_fixed_time_from_the_time_per_token(monkeypatch):
    fixed, rate = 60.0, 9000.0  # seconds a block run spends whatever its tokens; tokens per second beyond that
    calls = []

    def fake_recover(ckpt, teacher, *, tokens, **kw):
        calls.append(tokens)
        return SimpleNamespace(tokens=tokens, seconds=fixed + tokens / rate)

    monkeypatch.setattr(bench, "recover", fake_recover)
    monkeypatch.setattr(bench, "load_model", lambda path: (object(), None))
    monkeypatch.setattr(bench, "find_decoder_layers", lambda model: ([None] * 30, "model.layers"))
    args = argparse.Namespace(batch=4, train_seqlen=256, calib="c4.jsonl", lr=1e-4)
    budget = bench.block_budget(args, "ckpt", "dense", "cpu", seconds=1291.0)
    assert calls == [30 * 4 * 256, 9 * 30 * 4 * 256]  # one and nine steps per layer
    assert budget["fixed_seconds"] == pytest.approx(fixed, abs=0.1)
    assert budget["tokens"] == pytest.approx((1291.0 - fixed) * rate, rel=1e-3)  # not rate_of_one_probe * 1291
    # a budget shorter than the fixed part still trains every layer one step
    assert bench.block_budget(args, "ckpt", "dense", "cpu", seconds=10.0)["tokens"] == 30 * 4 * 256


def test_a_gradual_row_meets_its_target_only_at_its_last_prune():
    early = {"prune_step": 1, "tokens": 1000, "seconds": 60.0, "wikitext2": 33.0}  # 29% sparse: trivially low
    late = {"prune_step": 4, "tokens": 4000, "seconds": 1200.0, "wikitext2": 75.0}  # 2:4, but past 15 min
    row = {"start": "wanda", "schedule": {"steps": 4}, "curve": [early, late]}
    assert not bench.target_met(row)
    assert bench.target_met({**row, "curve": [early, {**late, "seconds": 800.0}]})
    assert bench.target_met({"start": "wanda", "curve": [{**early, "prune_step": None}]})  # one-shot rows: any point


def test_an_int4_row_is_judged_against_the_fp32_row_trained_alike():
    fp32 = {"start": "rotated", "loss": "kd", "lr": 1e-4, "seqlen": 256, "batch": 4, "tokens": 1000,
            "after": {"wikitext2": 40.0}}  # recorded before embeddings/checkpointing were: their defaults
    rows = {"rotated/kd (lr 5e-5)": {**fp32, "lr": 5e-5, "after": {"wikitext2": 30.0}}, "rotated/kd": fp32,
            "rotated/kd (+ embeddings)": {**fp32, "embeddings": True, "after": {"wikitext2": 35.0}}}
    int4 = {**fp32, "start": "rotated-int4", "embeddings": False, "checkpointing": True, "after": {"wikitext2": 43.9}}
    assert bench.reference_row(int4, rows) == "rotated/kd"
    assert bench.target_met(int4, rows)  # 43.9 <= 1.1 x 40
    assert not bench.target_met({**int4, "after": {"wikitext2": 44.1}}, rows)
    assert bench.target_met({**int4, "tokens": 2000}, rows) is None  # no fp32 row at its tokens


def test_the_sink_start_weighs_the_first_token_by_the_protocols_window_and_keeps_the_rotated_target():
    args = argparse.Namespace(seqlen=512, rotate_steps="100")
    rotated, sink = bench.prune_flags(args, "rotated"), bench.prune_flags(args, "rotated-sink")
    assert sink[:len(bench.STARTS["rotated"])] == bench.STARTS["rotated"]
    i = sink.index("--sink-weight")
    assert sink[i + 1] == "512" and sink[i + 2:] == ["--rotate-steps", "100"] == rotated[-2:]
    assert bench.prune_flags(argparse.Namespace(seqlen=64, rotate_steps="3"), "rotated-sink")[i + 1] == "64"
    assert bench.TARGETS["rotated-sink"] == bench.TARGETS["rotated"]
    assert "--sink-weight" not in rotated
