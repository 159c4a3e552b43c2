"""Where a run's metrics go besides metrics.jsonl, which is always written and is the source of truth:
`run.report_to = ["tensorboard"]` (event files in OUTPUT_DIR/tensorboard) and `"wandb"` (Weights &
Biases; `WANDB_MODE=offline` keeps it local, `WANDB_PROJECT` names the project, default "fasttune").
Every numeric field of every metrics line is logged at its step. A resumed run continues the same
logs: TensorBoard drops the events past the checkpoint's step (as metrics.jsonl does), and wandb
resumes the run whose id the first start saved in OUTPUT_DIR/wandb_id."""

import os
import uuid
from dataclasses import asdict
from pathlib import Path

from .config import ConfigError

class Reporters:
    def __init__(self, names, run_dir, cfg, step=0, resumed=False):
        self.tb = self.wandb = None
        run_dir = Path(run_dir)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError('run.report_to has "tensorboard" but the tensorboard package is not installed: '
                                  "pip install tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resumed else None)
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError('run.report_to has "wandb" but wandb is not installed: pip install wandb '
                                  "(WANDB_MODE=offline keeps the logs local)") from None
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fasttune"), dir=str(run_dir),
                                    name=run_dir.name, config=asdict(cfg), id=run_id, resume="allow", reinit=True)

    def log(self, row: dict):
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
