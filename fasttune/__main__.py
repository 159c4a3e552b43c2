"""`python -m fasttune ...`, which is what `torchrun --nproc_per_node N -m fasttune sft config.toml` runs."""

import os
import sys

from fasttune.cli import main

rc = main()
if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
    # A torchrun worker whose work is done and written: leave without the interpreter's teardown.
    # On the CPU (gloo) a worker was seen to abort there ("terminate called without an active
    # exception", a C++ thread destroyed at exit), turning a finished run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)
sys.exit(rc)
