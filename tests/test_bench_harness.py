"""The benchmark harness itself: skips say why, the memory measure is right, the report is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import report  # noqa: E402
from cases import make_case  # noqa: E402


def test_missing_peer_is_skipped_with_its_reason():
    if harness.device().type == "cuda":
        pytest.skip("on CUDA the peers run")
    with pytest.raises(harness.Unavailable, match="runs on CUDA only"):
        make_case("fused_linear_cross_entropy", "liger", {"N": 8, "H": 8, "V": 8}, "fp32")
    out = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "test_bench_attention.py"), "-q", "-rs",
                          "-k", "varlen_attn", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, cwd=BENCH.parent, env={**os.environ, "BENCH_SAVE": "0"})
    assert "SKIPPED" in out.stdout and "varlen_attn runs on CUDA only" in out.stdout, out.stdout[-2000:]
    assert out.returncode == 0 and "1 skipped" in out.stdout.splitlines()[-1], out.stdout[-500:]


@pytest.mark.parametrize("mib", [64, 256])
def test_memory_measure_sees_a_known_allocation(mib):
    peak = harness.peak_memory("alloc", "fasttune", {"mib": mib}, "fp32")
    assert abs(peak / 2**20 - mib) < 0.05 * mib + 4, peak / 2**20


def test_report_turns_a_fixture_into_the_expected_table():
    data = {"env": {"device": "CPU X", "date": "2026-01-02", "commit": "abc1234", "versions": {"torch": "2.13.0"}},
            "results": [
                {"kernel": "k", "shape": {"N": 2}, "dtype": "fp32", "provider": "naive", "median_s": 0.2,
                 "peak_bytes": 400 * 2**20, "tokens_per_s": 10.0, "tflops": 1.5, "skipped": None},
                {"kernel": "k", "shape": {"N": 2}, "dtype": "fp32", "provider": "liger", "median_s": None,
                 "peak_bytes": None, "tokens_per_s": None, "tflops": None, "skipped": "not installed"},
                {"kernel": "k", "shape": {"N": 2}, "dtype": "fp32", "provider": "fasttune", "median_s": 0.1,
                 "peak_bytes": 100 * 2**20, "tokens_per_s": 20.0, "tflops": 3.0, "skipped": None},
            ]}
    assert report.tables(data) == "\n".join([
        "Device: CPU X · 2026-01-02 · commit abc1234 · torch 2.13.0",
        "",
        "**k** (N=2, fp32, forward + backward)",
        "",
        "| provider | median time | peak memory | tokens/s | TFLOP/s | fasttune time ÷ this | fasttune memory ÷ this |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| naive | 200.0 ms | 400 MiB | 10 | 1.50 | 0.50 | 0.25 |",
        "| liger | skipped: not installed | | | | | |",
        "| fasttune | 100.0 ms | 100 MiB | 20 | 3.00 | 1.00 | 1.00 |",
    ])
    assert report.speed_ratios(data["results"]) == {}  # k is not a guarded kernel
    data["results"][0]["kernel"] = data["results"][2]["kernel"] = "dpo_loss"
    assert report.speed_ratios(data["results"]) == {'dpo_loss|{"N": 2}|fp32|naive': 2.0}


def test_plot_writes_a_png(tmp_path):
    files = sorted((BENCH / "results").glob("*.json"))
    if not files:
        pytest.skip("no committed results")
    report.plot(json.loads(files[-1].read_text()), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_report_tables_an_end_to_end_case_from_json_lines(tmp_path):
    env = {"device": "GPU Y", "date": "2026-01-03", "commit": "def5678", "versions": {"torch": "2.11.0"}}
    shape = {"model": "llama-3-8b", "seq": 4096, "ckpt": True}

    def line(provider, median_s, peak, agree=None, skipped=None):
        extra = {} if skipped else {"trained_tokens_per_s": 2048 / median_s, **(agree or {})}
        return json.dumps({"env": env, "kernel": "e2e_sft", "shape": shape, "dtype": "bf16", "provider": provider,
                           "median_s": median_s, "peak_bytes": peak, "tokens_per_s": median_s and 4096 / median_s,
                           "tflops": None, "skipped": skipped, "extra": extra})

    path = tmp_path / "e2e.jsonl"
    path.write_text("\n".join([
        line("fasttune", 1.0, 10 * 2**30, {"agrees": True}),
        line("hf_plain", 2.0, 20 * 2**30, {"agrees": False, "max_rel_diff": 0.05, "agrees_with": "fasttune"}),
        line("liger", None, None, skipped="liger-kernel not installed"),
    ]) + "\n")
    assert report.tables(report.load(path)) == "\n".join([
        "Device: GPU Y · 2026-01-03 · commit def5678 · torch 2.11.0",
        "",
        "**e2e_sft** (llama-3-8b, seq=4096, bf16, gradient checkpointing on; forward + backward + AdamW)",
        "",
        "| provider | median step | tokens/s | trained tokens/s | peak memory | fasttune tokens/s ÷ this "
        "| fasttune memory ÷ this | first losses agree |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        "| fasttune | 1,000.0 ms | 4,096 | 2,048 | 10,240 MiB | 1.00 | 1.00 | yes |",
        "| hf_plain | 2,000.0 ms | 2,048 | 1,024 | 20,480 MiB | 2.00 | 0.50 | **NO** (5.0e-02 vs fasttune) |",
        "| liger | skipped: liger-kernel not installed | | | | | | |",
    ])
