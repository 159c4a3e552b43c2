"""What a run writes for people: metrics.jsonl (one line per logged step), the progress bar, the
reporters (`run.report_to`), config.toml as resolved, and loss.png at the end.

Rank 0 writes them; the other ranks' RunLog does nothing. A resumed run keeps the metrics lines up to
the step it resumes from and appends after them.
"""

import json
from pathlib import Path

from .config import resolved_toml


def plot_losses(metrics_path, png_path, panels=()):
    """loss.png: train and eval loss, then the task's own curves, `Task.panels` (DPO: reward accuracy
    and margin; GRPO: the mean reward of each reward function, completion length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 4.5 * len(panels), 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_ylabel("loss")
    for ax, (title, keys) in zip(axes[0][1:], panels):
        keys = keys or ["reward"] + sorted(k for k in rows[0] if k.startswith("reward/"))
        for k in keys:
            ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], label=k)
        ax.set_title(title, fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def _progress_bar(total, initial, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


class RunLog:
    """metrics.jsonl, the progress bar and loss.png: rank 0 writes them, the other ranks nothing."""

    def __init__(self, run_dir, cfg, step, total, name, resumed, enabled, panels=()):
        self.path, self.enabled, self.panels = run_dir / "metrics.jsonl", enabled, panels
        if not enabled:
            return
        from .reporting import Reporters

        self.reporters = Reporters(cfg.run.report_to, run_dir, cfg, step, resumed)
        (run_dir / "config.toml").write_text(resolved_toml(cfg))
        kept = self.path.read_text().splitlines(keepends=True) if self.path.exists() and resumed else []
        self.path.write_text("".join(line for line in kept if json.loads(line)["step"] <= step))
        self.file = open(self.path, "a")
        self.bar = _progress_bar(total, step, name)

    def write(self, row):
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.reporters.log(row)

    def show(self, **shown):
        if self.enabled:
            self.bar.set_postfix(**shown)
            self.bar.update(1)

    def end_line(self):
        """Before an error is printed: the progress bar's line ends (the bar stays as it was)."""
        if self.enabled:
            self.bar.close()

    def close(self):
        if not self.enabled:
            return None
        self.bar.close()
        self.file.close()
        self.reporters.close()
        if not self.path.stat().st_size:
            return None
        plot_losses(self.path, self.path.parent / "loss.png", self.panels)
        with open(self.path) as f:
            return json.loads(f.readline())
