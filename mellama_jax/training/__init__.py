"""Training: the pure step and the run around it.

`step` (TrainState, the jitted train/eval step, AdamW schedule), `loop` (a run from start or resume to its last
step), `checkpoints` (the train state and data position, saved and restored), `run_dir` (the run's lock and
resume checks), `metrics_log` (metrics.jsonl, TensorBoard, loss.png), `validation`, `distributed` (multi-host
start-up), `gpu_flags` (XLA settings for NVIDIA GPUs), `cli` (`mellama train`).
"""
