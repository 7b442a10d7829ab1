"""Training metrics: a CSV file, TensorBoard events and a loss-curve PNG, all under the run folder.

Only rank 0 writes. On resume the CSV is cut back to the resumed step (so a run that was killed and resumed
has exactly one row per step) and TensorBoard purges the events after it.
"""

from __future__ import annotations

import csv
from pathlib import Path

CSV_FIELDS = [
    "step",
    "loss",
    "lr",
    "tokens_per_s",
    "val_loss",
    "val_ppl",
    "val_accuracy",
    "val_macro_f1",
    "elapsed_s",
]


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        self.png_path = run_dir / "loss.png"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_csv(resume_step)
        if not self.csv_path.exists():
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )

    def _truncate_csv(self, resume_step: int) -> None:
        if not self.csv_path.exists():
            return
        with self.csv_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, **values: float | None) -> None:
        if not self.enabled:
            return
        row = {k: ("" if values.get(k) is None else values[k]) for k in CSV_FIELDS}
        row["step"] = step
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)
        for key in ("loss", "lr", "tokens_per_s", "val_loss", "val_ppl", "val_accuracy", "val_macro_f1"):
            value = values.get(key)
            if value is not None and self.tb is not None:
                self.tb.add_scalar(
                    f"train/{key}" if key in ("loss", "lr", "tokens_per_s") else f"val/{key}", value, step
                )

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def plot(self) -> Path | None:
        """Redraw the loss-curve PNG from the CSV (cheap: a few thousand points at most)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, losses, val_steps, val_losses = [], [], [], []
        with self.csv_path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["loss"]:
                    steps.append(int(row["step"]))
                    losses.append(float(row["loss"]))
                if row["val_loss"]:
                    val_steps.append(int(row["step"]))
                    val_losses.append(float(row["val_loss"]))
        if not steps and not val_steps:
            return None
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if steps:
            ax.plot(steps, losses, label="train loss", linewidth=1, alpha=0.8)
        if val_steps:
            ax.plot(val_steps, val_losses, "o-", label="val loss", linewidth=1.5, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("lmforge training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png_path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.png_path)
        return self.png_path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
