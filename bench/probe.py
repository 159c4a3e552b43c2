"""Measure one case's peak memory in this fresh process: `probe.py KERNEL PROVIDER SHAPE_JSON DTYPE`.

Prints one JSON line {"peak_bytes": ...}. See harness.py for how the peak is defined.
"""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cases import make_case  # noqa: E402
from common import rss  # noqa: E402


def main():
    kernel, provider, shape, dtype = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    run = make_case(kernel, provider, shape, dtype)
    run()  # warm-up: lazy initialisation, compilation, autotuning
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        run()
        peak = rss("VmHWM") - base
    print(json.dumps({"peak_bytes": int(peak)}))


if __name__ == "__main__":
    main()
