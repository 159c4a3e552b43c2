"""The `fasttune` command line.

Commands so far: `fasttune env` prints what fasttune runs on (versions, device, kernel backend).
The trainer commands (`sft`, `dpo`, `grpo`, `check`, `merge`) are not built yet.
"""

import argparse
import platform
import sys

from fasttune import __version__


def _env(args) -> int:
    import torch

    from fasttune.kernels._backend import HAS_TRITON, pick_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fasttune     {__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    if HAS_TRITON:
        import triton

        print(f"triton       {triton.__version__}")
    else:
        print("triton       not installed (kernels use the PyTorch path)")
    print(f"device       {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"backend      {pick_backend(None, device)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune", description="Kernel-accelerated post-training for LLMs.")
    parser.add_argument("--version", action="version", version=f"fasttune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("env", help="print versions, device and the kernel backend in use").set_defaults(func=_env)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
