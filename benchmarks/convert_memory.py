"""Conversion memory and speed on a full-size shape: peak RSS and MB/s of `mellama convert`, both ways.

It writes a random-weight HF checkpoint of a preset's shape (bf16, 5 GB shards), times
`cat FILES > /dev/null` on it (the disk's own read speed, in the same run) and `cat FILES > COPY`
(read + write: what any converter must at least do), then runs `mellama convert hf-to-jax` and
`mellama convert jax-to-hf` as child processes and reads each one's peak resident memory from the
kernel (wait4). Every timing starts with a cold page cache (when the kernel lets us drop it) and
ends after `sync`, so written data is on disk. Nothing is asserted: the figures go to BENCHMARKS.md.

    python benchmarks/convert_memory.py --preset llama2_7b --work /tmp/convert-bench
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from mellama_jax.config import ModelConfig
from mellama_jax.config_file import PRESETS
from mellama_jax.hf.config import hf_config
from mellama_jax.hf.files import hf_weight_files, read_hf_tensors, read_safetensors_index, write_safetensors_shards
from mellama_jax.hf.table import hf_shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Finite random bf16 values (|x| in [2^-8, 2^0)), made from random bits without a float32 detour."""
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    bits = (bits & 0x807F) | (((bits >> 7) & 0x7) + 119 << 7).astype(np.uint16)  # sign, exponent 2^-8..2^-1
    return bits.view(ml_dtypes.bfloat16)


def write_source(preset: str, folder: pathlib.Path, shard_bytes: int) -> int:
    cfg = getattr(ModelConfig, preset)()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    shapes = hf_shapes(cfg)
    rng = np.random.default_rng(0)
    specs = [(name, shape, np.dtype(ml_dtypes.bfloat16)) for name, shape in shapes.items()]
    write_safetensors_shards(specs, lambda name: random_bf16(shapes[name], rng), folder, shard_bytes)
    return sum(int(np.prod(s)) * 2 for s in shapes.values())


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds (until its writes are synced) and peak RSS (GB) of one child process, from a cold cache."""
    drop_page_cache()
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    os.sync()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} failed")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def drop_page_cache() -> bool:
    try:
        os.sync()
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2_7b", choices=sorted(PRESETS))
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/mellama-convert-bench"))
    parser.add_argument("--shard-size", type=int, default=5 * 10**9, help="bytes per source shard (default 5 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.work.exists():
        sys.exit(f"{args.work} exists; pass a fresh --work folder (this benchmark deletes it afterwards)")

    source, ours, back = args.work / "hf", args.work / "ours", args.work / "back"
    t = time.perf_counter()
    total = write_source(args.preset, source, args.shard_size)
    print(f"wrote a random {args.preset} HF checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    mellama = [sys.executable, "-m", "mellama_jax.cli", "convert"]
    cold = drop_page_cache()
    files = [str(f) for f in hf_weight_files(source)]
    read_wall, _ = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
    copy_wall, _ = timed(["sh", "-c", f'cat "$@" > {args.work / "copy"}', "cat", *files])
    (args.work / "copy").unlink()
    to_jax = timed([*mellama, "hf-to-jax", str(source), str(ours)])
    to_hf = timed([*mellama, "jax-to-hf", str(ours), str(back)])

    original = read_hf_tensors(source)
    for name, info in read_safetensors_index(hf_weight_files(back)[-1]).items():  # spot-check: bit-identical
        assert info.read().tobytes() == original[name].read().tobytes(), name

    read, copy = total / read_wall / 1e6, total / copy_wall / 1e6
    print(f"\n{args.preset}, {total / 1e9:.2f} GB bf16; {platform.machine()}, {os.cpu_count()} cores; cold: {cold}")
    print("| what | wall s | peak RSS GB | MB/s | % of read speed | % of copy speed |")
    print("|---|---|---|---|---|---|")
    rows = [("`cat FILES > /dev/null` (read)", read_wall, None), ("`cat FILES > COPY` (read + write)", copy_wall, None)]
    rows += [("mellama convert hf-to-jax", *to_jax), ("mellama convert jax-to-hf", *to_hf)]
    for name, wall, rss in rows:
        speed, memory = total / wall / 1e6, "–" if rss is None else f"{rss:.2f}"
        shares = f"{100 * speed / read:.0f} % | {100 * speed / copy:.0f} %"
        print(f"| {name} | {wall:.1f} | {memory} | {speed:.0f} | {shares} |")
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
