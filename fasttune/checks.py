"""`fasttune check CONFIG.toml`, each command's part: validate its data (and, for GRPO, its reward
functions) and print what a run would train on, trained tokens between « and ». Train nothing.
fasttune/tasks.py names these functions (`TaskSpec.check`); cli.py prints the resolved config first."""

from .masks import IGNORE


def marked(tok, ids, labels) -> str:
    """The example's text with the trained spans between « and »."""
    out, run, trained = [], [], None
    for i, lab in zip(ids, labels):
        t = lab != IGNORE
        if trained is not None and t != trained:
            text = tok.decode(run)
            out.append(f"«{text}»" if trained else text)
            run = []
        run.append(i)
        trained = t
    if run:
        text = tok.decode(run)
        out.append(f"«{text}»" if trained else text)
    return "".join(out)


def check_sft(cfg, tok):
    from .batches import packing_efficiency, packing_rows
    from .data import load_sft

    for name in ("train", "eval"):
        path = getattr(cfg.data, name)
        if not path:
            continue
        examples, report = load_sft(path, tok, cfg.data)
        print(f"[{name}] " + report.summary())
        lengths = [len(e.input_ids) for e in examples]
        if cfg.data.packing:
            rows = packing_rows(lengths, cfg.train.micro_batch_size)
            print(f"  packing: {len(rows)} rows of {cfg.train.micro_batch_size} tokens, "
                  f"{100 * packing_efficiency(lengths, rows, cfg.train.micro_batch_size):.1f}% filled")
        else:
            print(f"  no packing: micro-batches of {cfg.train.micro_batch_size} sequences, padded to the longest")
        if name == "train":
            ex = examples[0]
            print(f"  first example ({ex.where}), trained tokens between « and »:\n"
                  + "\n".join("    " + line for line in marked(tok, ex.input_ids, ex.labels).splitlines()))
    print("ok: the config and the data are valid")


def check_dpo(cfg, tok):
    check_pairs(cfg, tok, cfg.dpo)


def check_pairs(cfg, tok, section):
    """The preference pairs of data.train and data.eval, read with `section`'s lengths."""
    from .preference import load_pairs

    for name in ("train", "eval"):
        if getattr(cfg.data, name):
            pairs, report = load_pairs(getattr(cfg.data, name), tok, cfg.data, section)
            print(f"[{name}] " + report.summary())
            if name == "train":
                p = pairs[0]
                print(f"  first pair ({p.where}), trained tokens between « and »:\n    chosen:   "
                      + marked(tok, p.chosen.input_ids, p.chosen.labels).replace("\n", "\n              ")
                      + "\n    rejected: " + marked(tok, p.rejected.input_ids, p.rejected.labels).replace("\n", "\n              "))
    print("ok: the config and the data are valid")


def check_grpo(cfg, tok):
    from .grpo import GRPOTask

    task = GRPOTask(cfg, tok, print)  # reads the prompts and tries every reward function
    p = task.prompts[0]
    print(f"  first prompt ({p['where']}), as the model sees it:\n    " + p["text"].replace("\n", "\n    "))
    print("ok: the config, the prompts and the reward functions are valid")
