"""Runs last: the same-run speed ratios of this session against bench/baseline.json.

Time is never compared across runs or machines; only ratios measured in this run are, and a ratio
may fall at most `tolerance` (25%) below the committed one. Cases this session did not run are skipped.
"""

import json

import pytest
from dataclasses import asdict

import report


def test_speed_ratios_hold(recorder):
    base = json.loads(report.BASELINE.read_text())
    ratios = report.speed_ratios([asdict(r) for r in recorder])
    checked = {k: v for k, v in ratios.items() if k in base["ratios"]}
    if not checked:
        pytest.skip("no case of bench/baseline.json ran in this session")
    low = {k: (v, base["ratios"][k]) for k, v in checked.items() if v < (1 - base["tolerance"]) * base["ratios"][k]}
    assert not low, "speed ratios fell more than 25% below bench/baseline.json: " + "; ".join(
        f"{k}: {v:.2f} (baseline {b:.2f})" for k, (v, b) in low.items())
