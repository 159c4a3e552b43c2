"""Benchmark session: collect every case's Result, save them to bench/results/, print the table.

The Triton interpreter is not used here: on the CPU, fasttune runs its PyTorch path.
Set BENCH_SAVE=0 to leave bench/results/ untouched. With BENCH_JSONL=FILE each result is also
appended to FILE as one JSON line the moment it is recorded (bench/gpu_check.sh: a timeout loses
nothing already measured; `python bench/report.py FILE` tables it).
"""

import json
import os
from dataclasses import asdict

import pytest

import harness
import report


class _Recorder(list):
    def append(self, res):
        super().append(res)
        if os.environ.get("BENCH_JSONL"):
            with open(os.environ["BENCH_JSONL"], "a") as f:
                f.write(json.dumps({"env": harness.env_info(), **asdict(res)}) + "\n")


_RESULTS = _Recorder()


@pytest.fixture(scope="session")
def recorder():
    return _RESULTS


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    data = {"env": harness.env_info(), "results": [asdict(r) for r in _RESULTS]}
    terminalreporter.write_sep("=", "fasttune benchmark results")
    terminalreporter.write_line(report.tables(data))
    if os.environ.get("BENCH_SAVE", "1") != "0":
        terminalreporter.write_line(f"\nsaved to {harness.save(_RESULTS)}")
