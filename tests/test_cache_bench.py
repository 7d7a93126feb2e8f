"""`kdfast bench budget` with cached arms: no teacher forward in their step, the cache lookup in the
data phase, and the cache's build cost on its own row, charged by --charge-teacher."""
from __future__ import annotations

import json

from kdfast.cli import main

TINY = ["--quick", "--device", "cpu", "--batch", "4", "--seq", "32", "--warmup", "1", "--rounds", "2",
        "--steps-per-round", "2"]


def test_cached_arms_in_the_budget_bench(tmp_path):
    rc = main(["bench", "budget", *TINY, "--strategies", "no-kd,vanilla-cached-topk,vanilla-cached-sample",
               "--budget", "1e15flop", "--charge-teacher", "amortized:2", "--teacher-pretraining-flops", "1e13",
               "--cache-tokens", "1e6", "--cache-k", "8", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "budget.json").read_text())
    nokd, *cached = report["strategies"]
    assert nokd["teacher_cache"] is None and nokd["teacher_charge_flops"] == 0
    for arm in cached:
        assert arm["tokens_per_step"] == 4 * 32 and arm["budget_tokens"] == arm["budget_steps"] * 4 * 32
        cache = arm["teacher_cache"]
        assert cache["k"] == 8 and cache["tokens"] == 1e6 and cache["synthetic"]
        assert cache["charged_flops"] == cache["build_flops"] / 2
        assert arm["teacher_charge_flops"] == 1e13 / 2 + cache["build_flops"] / 2
        assert arm["flops_analytic_parts"]["teacher_forward"] == 0
        assert arm["breakdown_ms"]["teacher_forward"] < 1.0 and arm["breakdown_ms"]["kd_loss"] > 0
    text = (tmp_path / "budget.md").read_text()
    assert "CachedKD-topK2" in text and "| cache for | K |" in text
