"""FSDP gathers move bf16: weights are cast to the compute dtype on their shards, then gathered.

The HLO checked is the one right after SPMD partitioning (dumped by XLA): XLA:CPU later widens every
bf16 collective to fp32 (the CPU runtime has no bf16 reductions), so the final CPU program cannot tell
the two apart, while the partitioned program is what a GPU compile starts from.
"""

import dataclasses
import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mellama_jax.config import MeshConfig, ModelConfig, TrainConfig
from mellama_jax.model.sharding import activation_mesh, batch_sharding, make_mesh
from mellama_jax.training.step import BATCH_KEYS, abstract_state, state_shardings, train_step

MODEL = ModelConfig.tiny(
    vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, dtype="bfloat16", remat="full"
)
CFG = TrainConfig(model=MODEL, seq_len=16, global_batch=8, micro_batches=1, steps=2, mesh=MeshConfig(fsdp=8))
GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\S* all-gather\(")


def partitioned_hlo(cfg: TrainConfig, dump: pathlib.Path) -> str:
    """The train step's HLO as the SPMD partitioner leaves it (collectives placed, nothing widened yet)."""
    mesh = make_mesh(cfg.mesh)
    state_sh = state_shardings(cfg, mesh)
    batch = {k: jax.ShapeDtypeStruct((cfg.global_batch, cfg.seq_len), jnp.int32) for k in BATCH_KEYS}
    step = jax.jit(
        functools.partial(train_step, cfg),
        in_shardings=(state_sh, {k: batch_sharding(mesh) for k in BATCH_KEYS}),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
    )
    with activation_mesh(mesh):
        lowered = step.lower(abstract_state(cfg, mesh), batch)
    lowered.compile(compiler_options={"xla_dump_to": str(dump), "xla_dump_hlo_pass_re": "spmd-partitioning"})
    (text,) = [p.read_text() for p in dump.glob("*train_step*after_spmd-partitioning*.txt")]
    return text


def weight_sizes(cfg: TrainConfig) -> set[int]:
    """Element counts of every weight as one layer sees it (the stacked [L, ...] axis dropped)."""
    sizes = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state(cfg, make_mesh(cfg.mesh)).params):
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        sizes.add(math.prod(leaf.shape[1:] if stacked else leaf.shape))
    return sizes


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_gathers_weights_in_bf16(tmp_path, tied):
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(MODEL, tie_embeddings=tied))
    gathers = [
        (dtype, math.prod(int(d) for d in dims.split(",") if d))
        for dtype, dims in GATHER.findall(partitioned_hlo(cfg, tmp_path))
    ]
    sizes = weight_sizes(cfg)
    of_weights = [(dtype, n) for dtype, n in gathers if n in sizes]
    # Not vacuous: every weight of a layer (q, k, v, o, gate, up, down, two norms) and the embedding table is gathered.
    assert {n for _, n in of_weights} == sizes, (sorted(sizes), of_weights)
    wide = [(dtype, n) for dtype, n in of_weights if dtype != "bf16"]
    assert not wide, f"weight-sized gathers not in bf16 (dtype, elements): {wide}"
