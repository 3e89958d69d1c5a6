"""Where a run's metrics go: `metrics.jsonl` (one object per step), TensorBoard events, and `loss.png`.

Rows are of two kinds, told apart by their keys: a training step's (`loss`, `grad_norm`, `lr`, ...), and a
validation's (`val_loss`, `val_ppl`, `val_tokens`, and `val_set`, which names the eval set; validation.py),
which follows its step's training row (step 0's comes first). In TensorBoard they are `train/...` and
`val/...`; `loss.png` draws both losses, the validation's one line per eval set.

The history survives kills. On resume, `metrics.jsonl` is rewritten beside itself and renamed into place
with every row up to the restored step (rows after it were never checkpointed, so they are redone), then
appended to. A torn or non-JSON line (a kill mid-write) is dropped with a warning naming it. The run has
one TensorBoard event file, appended to across restarts; a resume first cuts off a torn last record,
then marks a restart at its step, so TensorBoard drops the steps that are being redone. `loss.png` is
redrawn at every checkpoint. Only process 0 writes (`enabled`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import socket
import struct
import time

from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from mellama_jax.outdir import replace_file

log = logging.getLogger(__name__)


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a metrics file; lines that are not whole JSON objects with a step are dropped, with a warning."""
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            log.warning("%s:%d: not a metrics row (torn by a kill?); dropped", path, number)
    return rows


class EventFile:
    """One TensorBoard event file per run, appended to."""

    def __init__(self, folder: pathlib.Path, start_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        found = sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        path = found[-1] if found else folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        whole = _whole_records(path.read_bytes()) if found else 0
        if found:
            os.truncate(path, whole)
        self.file = open(path, "ab")  # noqa: SIM115 - held open for the run, closed in close()
        # A file a kill left empty gets its version record too: without it, TensorBoard ignores restart events
        # and shows the redone steps twice.
        if not whole:
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        else:  # on a restart event, TensorBoard drops the events of steps >= its step: those are being redone
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(wall_time=time.time(), step=start_step + 1, session_log=restart))
        self.file.flush()

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.file.write(
            header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _whole_records(raw: bytes) -> int:
    """The length of the prefix of `raw` made of whole, intact records (header, its CRC, data, its CRC): a
    torn or zero-filled tail would stop TensorBoard's reader before anything appended after it."""
    end = 0
    while end + 12 <= len(raw):
        header = raw[end : end + 8]
        (length,) = struct.unpack("<Q", header)
        data = raw[end + 12 : end + 12 + length]
        crcs = raw[end + 8 : end + 12], raw[end + 12 + length : end + 16 + length]
        if len(data) < length or crcs != (_crc(header), _crc(data)):
            break
        end += 16 + length
    return end


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", masked_crc32c(data))


def is_validation(row: dict) -> bool:
    """Whether a metrics row is a validation's (else a training step's)."""
    return "val_loss" in row


class MetricsLog:
    """The run's metrics files (process 0's; elsewhere `enabled` is False and only `rows` and `evals` are kept):
    `rows` are the training steps', `evals` the validations'."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, enabled: bool = True):
        self.run_dir, self.enabled, self.rows, self.evals = pathlib.Path(run_dir), enabled, [], []
        if not enabled:
            return
        path, kept = self.run_dir / "metrics.jsonl", []
        if path.is_file():
            kept = [row for row in read_rows(path) if row["step"] <= start_step]
        replace_file(path, "".join(json.dumps(row) + "\n" for row in kept).encode())
        for row in kept:
            (self.evals if is_validation(row) else self.rows).append(row)
        self.file = open(path, "a")  # noqa: SIM115 - held open for the run, closed in close()
        self.events = EventFile(self.run_dir / "tensorboard", start_step)

    def write(self, row: dict) -> None:
        """Appends a training or a validation row (`val_*` keys, shown as `val/*` in TensorBoard)."""
        validation = is_validation(row)
        (self.evals if validation else self.rows).append(row)
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.file.name) from e
        tag = (lambda k: k.replace("val_", "val/", 1)) if validation else (lambda k: f"train/{k}")
        finite = {tag(k): v for k, v in row.items() if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        self.events.scalars(row["step"], finite)

    def validated(self, step: int) -> bool:
        """Whether `step` has its validation row."""
        return any(row["step"] == step for row in self.evals)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.events.close()
        self.plot()

    def plot(self) -> None:
        """Redraws `loss.png` (training and validation loss on a log scale, learning rate beside it), written
        whole or not at all."""
        if not (self.enabled and (self.rows or self.evals)):
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        steps = [row["step"] for row in self.rows]
        figure, loss_axis = plt.subplots(figsize=(8, 4.5))
        lines = loss_axis.plot(steps, [row["loss"] for row in self.rows], color="tab:blue", label="training loss")
        sets = [[]]  # runs of rows of one eval set: a resume with another one starts a new line
        for row in self.evals:
            if sets[-1] and row.get("val_set") != sets[-1][-1].get("val_set"):
                sets.append([])
            sets[-1].append(row)
        for i, rows in enumerate(sets if self.evals else []):
            label = "validation loss" + (f" (another eval set from step {rows[0]['step']})" if i else "")
            color = "tab:green" if i % 2 == 0 else "tab:olive"
            lines += loss_axis.plot([row["step"] for row in rows], [row["val_loss"] for row in rows], "o-",
                                    color=color, markersize=4, label=label)  # fmt: skip
        loss_axis.set(xlabel="step", ylabel="loss", yscale="log")
        lr_axis = loss_axis.twinx()
        lines += lr_axis.plot(steps, [row["lr"] for row in self.rows], color="tab:orange", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, dpi=100, format="png")
        plt.close(figure)
        replace_file(self.run_dir / "loss.png", image.getvalue())
