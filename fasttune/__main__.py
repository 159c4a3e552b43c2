"""`python -m fasttune ...`, which is what `torchrun --nproc_per_node N -m fasttune sft config.toml` runs."""

import sys

from fasttune.cli import main

sys.exit(main())
