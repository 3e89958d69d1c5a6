"""Where a run's metrics go: `metrics.jsonl` (one object per step), TensorBoard events, and `loss.png`.

On resume, rows after the restored step are dropped from `metrics.jsonl`, so the file always tells the
history of the checkpointed run, with no step twice. Only process 0 writes (`enabled`).
"""

from __future__ import annotations

import json
import math
import pathlib


class MetricsLog:
    def __init__(self, run_dir: pathlib.Path, start_step: int, enabled: bool = True):
        self.run_dir, self.enabled, self.rows = pathlib.Path(run_dir), enabled, []
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in kept if row["step"] <= start_step]
        self.file = open(path, "w")  # noqa: SIM115 - held open for the run, closed in close()
        for row in self.rows:
            self.file.write(json.dumps(row) + "\n")
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and value is not None and math.isfinite(value):
                self.tensorboard.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tensorboard.close()
        if self.rows:
            self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        steps = [row["step"] for row in self.rows]
        figure, loss_axis = plt.subplots(figsize=(8, 4.5))
        loss_axis.plot(steps, [row["loss"] for row in self.rows], color="tab:blue")
        loss_axis.set(xlabel="step", ylabel="loss")
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [row["lr"] for row in self.rows], color="tab:orange")
        lr_axis.set_ylabel("learning rate")
        figure.tight_layout()
        figure.savefig(self.run_dir / "loss.png", dpi=100)
        plt.close(figure)
