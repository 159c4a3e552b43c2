"""The `fasttune` command line.

    fasttune sft CONFIG.toml [--set section.key=value ...]   supervised fine-tuning
    fasttune dpo CONFIG.toml [--set ...]                     preference training (DPO)
    fasttune grpo CONFIG.toml [--set ...]                    online RL with reward functions (GRPO)
    fasttune kto CONFIG.toml [--set ...]                     KTO on unpaired, labelled completions
    fasttune reward CONFIG.toml [--set ...]                  a reward model (LoRA + scalar head) on pairs
    fasttune check CONFIG.toml [--set ...]                   validate config and data, train nothing
    fasttune sft CONFIG.toml --nproc N                       the same on N processes (GPUs) under torchrun
    torchrun --nproc_per_node N -m fasttune sft CONFIG.toml  the same, torchrun's way (and --nnodes)
    fasttune merge RUN_DIR --out DIR [--dtype bf16]          merge the adapter into the base model
    fasttune generate RUN_OR_CHECKPOINT --prompts FILE       completions for a file of prompts (JSONL out)
    fasttune chat RUN_OR_CHECKPOINT                          talk to it in the terminal (or over a pipe)
    fasttune eval CONFIG.toml [--adapter RUN|base]           held-out metrics, before and after training
    fasttune env                                             versions, device, kernel backend

Mistakes in the config or the data print one clear line (file, line, key or example) and exit 2.
"""

import argparse
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

__version__ = version("fasttune")  # `fasttune` is a namespace package (no __init__.py): see kernels/README.md


def _env(args) -> int:
    import torch

    from fasttune.kernels._backend import HAS_TRITON, pick_backend

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fasttune     {__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__}")
    if HAS_TRITON:
        import triton

        print(f"triton       {triton.__version__}")
    else:
        print("triton       not installed (kernels use the PyTorch path)")
    print(f"device       {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    print(f"backend      {pick_backend(None, dev)}")
    return 0


def _launch(args) -> int:
    """`--nproc N`: this command again, on N processes of this machine under torchrun. The config is
    checked here first, so a mistake is one line, not one per process."""
    from fasttune.config import load_config
    from fasttune.distributed import mode_for

    mode_for(load_config(args.config, args.set), launched=True)  # a parallel mode it refuses: one line, here
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "fasttune", args.command, args.config, *[x for s in args.set for x in ("--set", s)]]
    from fasttune.stopping import forward_to

    return forward_to(subprocess.Popen(argv))


def _train(args) -> int:
    """`fasttune sft|dpo|grpo|...`: the command's task (fasttune/tasks.py) on the shared loop."""
    from fasttune.config import load_config
    from fasttune.tasks import TASKS
    from fasttune.train import train

    spec = TASKS[args.command]
    train(load_config(args.config, args.set, schema=spec.load("schema")), spec.load("task"))
    return 0


def _check(args) -> int:
    from fasttune.config import load_config, resolved_toml
    from fasttune.models import load_tokenizer
    from fasttune.tasks import for_config

    cfg = load_config(args.config, args.set)
    print(f"# {args.config}, resolved\n{resolved_toml(cfg)}")
    for_config(cfg).load("check")(cfg, load_tokenizer(cfg.model))
    return 0


def _merge(args) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fasttune import builtin
    from fasttune.checkpoint import run_of
    from fasttune.config import ConfigError
    from fasttune.models import load_tokenizer

    src = Path(args.run_dir)
    cfg, ck = run_of(src)
    if ck is None:
        raise ConfigError(f"{src}: not a run folder (config.toml with checkpoints/) or a checkpoint folder")
    if not (ck / "adapter_config.json").is_file():
        raise ConfigError(f"{ck} holds a full fine-tune, not an adapter: it is already a complete model")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    base = AutoModelForCausalLM.from_pretrained(builtin.resolve(cfg.model.path), dtype=dtype)
    merged = PeftModel.from_pretrained(base, ck).merge_and_unload()
    out = Path(args.out)
    merged.save_pretrained(out)
    load_tokenizer(cfg.model).save_pretrained(out)
    print(f"merged {ck} into {cfg.model.path} ({args.dtype}): {out}")
    return 0


def _check_sampling(args):
    """The sampling flags, each a clear error when out of range (before any model is loaded)."""
    from fasttune.config import ConfigError

    bad = [(f, v, want) for f, v, want, ok in (
        ("--max-new-tokens", args.max_new_tokens, "at least 1", args.max_new_tokens >= 1),
        ("--temperature", args.temperature, "0 (greedy) or more", args.temperature >= 0),
        ("--top-p", args.top_p, "in (0, 1]", 0 < args.top_p <= 1),
        ("--num-samples", getattr(args, "num_samples", 1), "at least 1", getattr(args, "num_samples", 1) >= 1),
        ("--batch-size", getattr(args, "batch_size", 1), "at least 1", getattr(args, "batch_size", 1) >= 1),
    ) if not ok]
    if bad:
        f, v, want = bad[0]
        raise ConfigError(f"{f} {v}: must be {want}")


def _generate(args) -> int:
    import json

    from fasttune.infer import generate, load
    from fasttune.models import device
    from fasttune.prompts import read_prompts

    _check_sampling(args)
    prompts = read_prompts(args.prompts)  # a bad file fails before the model is loaded
    loaded = load(args.target, device(), base=args.base)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    print(f"generating {args.num_samples} completion(s) for each of {len(prompts)} prompts with {loaded.what}",
          file=sys.stderr)
    completions = generate(loaded.model, loaded.tok, [p.messages for p in prompts], num_samples=args.num_samples,
                           batch_size=args.batch_size, weights=args.weights, **settings)
    lines = "".join(json.dumps({"prompt": p.prompt, "completion": c, "sample": k, "model": loaded.what, **settings},
                               ensure_ascii=False) + "\n" for p, samples in zip(prompts, completions)
                    for k, c in enumerate(samples))
    if args.out:
        Path(args.out).write_text(lines)
        print(f"wrote {sum(map(len, completions))} completions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _chat(args) -> int:
    from fasttune.infer import chat, load
    from fasttune.models import device

    _check_sampling(args)
    loaded = load(args.target, device(), base=args.base)
    if sys.stdin.isatty():
        print(f"model: {loaded.what}")
    chat(loaded.model, loaded.tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
         weights=args.weights)
    return 0


def _eval(args) -> int:
    import json

    from fasttune.config import load_config
    from fasttune.evaluation import evaluate, table

    cfg = load_config(args.config, args.set)
    metrics = evaluate(cfg, args.adapter, log=lambda m: print(m, file=sys.stderr))
    print(table(metrics))
    print(json.dumps(metrics))  # the last line, for scripts
    return 0


def _parser() -> argparse.ArgumentParser:
    """Every command's arguments: the tasks' from the registry, then check, merge, generate, chat, eval, env."""
    parser = argparse.ArgumentParser(prog="fasttune", description="Kernel-accelerated post-training for LLMs.")
    parser.add_argument("--version", action="version", version=f"fasttune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from fasttune.tasks import TASKS

    for name, fn, text in [*((name, _train, spec.help) for name, spec in TASKS.items()),
                           ("check", _check, "validate a config and its data without training")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="the run's TOML config")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set train.max_steps=10")
        if name != "check":
            p.add_argument("--nproc", type=int, default=0, metavar="N",
                           help="train on N processes (one per GPU) under torchrun; train.grad_accum is per process")
        p.set_defaults(func=fn)
    p = sub.add_parser("merge", help="merge a run's LoRA adapter into its base model",
                       description="merge a run's LoRA adapter (its last checkpoint, or the one given) into the base "
                                   "model and save a Hugging Face model that transformers and vLLM load")
    p.add_argument("run_dir", help="a run's output_dir, or one of its checkpoint folders")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=_merge)
    _add_using(sub)
    sub.add_parser("env", help="print versions, device and the kernel backend in use").set_defaults(func=_env)
    return parser


def _sampling_flags(p, temperature):
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--base", action="store_true", help="the run's base model without its adapter, to compare")
    p.add_argument("--weights", choices=("auto", "merged", "live"), default="auto",
                   help="an adapter run samples from a merged dense copy (merged), the 4-bit model and adapter "
                        "as trained (live), or merged when it fits (auto)")


def _add_using(sub):
    """The commands that use a trained model: generate, chat, eval."""
    target = "a run folder (its last checkpoint), a checkpoint folder, a merged folder or a model folder"
    p = sub.add_parser("generate", help="complete a file of prompts with a trained model",
                       description="complete the prompts of a JSON or JSONL file (\"prompt\" as text or messages, or "
                                   "\"messages\"), rendered with the chat template; one JSON line per prompt and sample")
    p.add_argument("target", help=target)
    p.add_argument("--prompts", required=True, help="JSON or JSONL file of prompts")
    p.add_argument("--out", help="JSONL file for the completions (default: standard output)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    _sampling_flags(p, 0.7)
    p.set_defaults(func=_generate)
    p = sub.add_parser("chat", help="talk to a trained model in the terminal",
                       description="a multi-turn chat, streamed; /reset, /system TEXT, /exit. With input piped in, "
                                   "each line is a user turn and only the replies are printed")
    p.add_argument("target", help=target)
    _sampling_flags(p, 0.7)
    p.set_defaults(func=_chat)
    p = sub.add_parser("eval", help="held-out metrics of a run (or of the base model)",
                       description="SFT: loss, perplexity, token accuracy; DPO: reward accuracy and margin, log-probs; "
                                   "GRPO: mean rewards over sampled completions. On data.eval, else data.train. The "
                                   "last line is one JSON object")
    p.add_argument("config", help="the run's TOML config")
    p.add_argument("--adapter", default=None, help="a run or checkpoint folder, or \"base\" for the model before "
                   "training (default: the last checkpoint of run.output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from fasttune.checkpoint import ResumeError
    from fasttune.config import ConfigError
    from fasttune.sources import DataError
    from fasttune.train import TrainingError
    from fasttune.stopping import Stopped

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if getattr(args, "nproc", 0) > 0:
            return _launch(args)
        return args.func(args)
    except Stopped as e:  # a stop signal, after the checkpoint: one line, the signal's exit status
        if rank == 0:
            print(e, file=sys.stderr)
        return e.code
    except (ConfigError, DataError, ResumeError, TrainingError) as e:
        # under torchrun a config error or a resume refusal is the same on every rank: rank 0 says it.
        # Others (bad data, a reward function failing on one rank's example) are said by the rank that met them
        if world == 1:
            print(f"error: {e}", file=sys.stderr)
        elif rank == 0 or not isinstance(e, (ConfigError, ResumeError)):
            print(f"error (rank {rank} of {world}): {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
