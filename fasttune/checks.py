"""What `fasttune check CONFIG.toml` prints, shared by the tasks' `check` functions (each in its task's
module, named by `TaskSpec.check`): an example with its trained tokens between « and », and the
preference pairs that DPO and reward models read. cli.py prints the resolved config first."""

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
