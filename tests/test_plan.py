"""`mellama plan`: the train step compiled for A100/H100/TPU targets without the devices, memory per device,
fit, what helps, and the search. GPU targets need the `cuda` extra, TPU ones the `tpu` extra (CI installs both)."""

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from mellama_jax import hardware
from mellama_jax.config import MeshConfig, ModelConfig, TrainConfig
from mellama_jax.config_file import load_config
from mellama_jax.errors import UserError
from mellama_jax.planning import devices as dev
from mellama_jax.planning.plan import Layout, estimate, layout, measure, problems, xla_options
from mellama_jax.planning.report import Target, report

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None, reason="needs pip install -e '.[cuda]'"
)
needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs pip install -e '.[tpu]'")
GIB = 2**30


def config(name: str, *overrides: str) -> TrainConfig:
    return load_config(str(ROOT / "configs" / name), list(overrides))


def proto(text: str) -> dict[str, float | str]:
    """A text proto's fields, nested names joined by dots: 'gpu_device_info.cuda_compute_capability.major'."""
    fields, path = {}, []
    for token in re.findall(r'\w+\s*\{|\}|\w+:\s*(?:"[^"]*"|\S+)', text):
        if token.endswith("{"):
            path.append(token[:-1].strip())
        elif token == "}":
            path.pop()
        else:
            key, value = (part.strip() for part in token.split(":", 1))
            fields[".".join([*path, key])] = value.strip('"') if value.startswith('"') else float(value)
    return fields


@pytest.mark.parametrize("kind, reference", [("a100-80g", "a100_sxm_80.txtpb"), ("h100-80g", "h100_sxm.txtpb")])
def test_our_gpu_target_configs_state_the_reference_facts(shared_data, kind, reference):
    ours = proto(hardware.KINDS[kind].gpu.target_config())
    theirs = proto((shared_data / "gpu_targets" / reference).read_text())
    for key in ours.keys() | theirs.keys():  # proto3: an absent number is 0
        assert ours.get(key, 0.0) == theirs.get(key, 0.0), key


@needs_cuda
@pytest.mark.parametrize("kind, reference", [("a100-80g", "a100_sxm_80.txtpb"), ("h100-80g", "h100_sxm.txtpb")])
def test_the_step_compiled_for_our_target_uses_the_memory_it_does_for_the_reference(shared_data, kind, reference):
    """Tolerance: 1 % of each figure (equal facts should give the same program, byte for byte)."""
    from jax.experimental import topologies

    cfg = dataclasses.replace(
        TrainConfig(model=ModelConfig.llama2_7b(n_layers=2)), seq_len=1024, global_batch=32, micro_batches=2
    )
    lay = Layout(2, 8, 1, 2, 1)
    text = (shared_data / "gpu_targets" / reference).read_text()
    devices = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x2x8").devices
    target = Target(hardware.KINDS[kind], 16)
    ours, theirs = target.measure(cfg, lay), measure(cfg, Target(hardware.KINDS[kind], 16, devices).mesh(lay))
    assert target.mesh(lay).devices.flat[0].device_kind == hardware.KINDS[kind].gpu.description
    assert ours.temp > GIB
    for field in ("params", "opt_state", "batch", "temp", "outputs", "code"):
        assert getattr(ours, field) == pytest.approx(getattr(theirs, field), rel=0.01), field


@functools.cache  # two tests read the 70B report
def plan_cli(*args: str) -> tuple[str, dict[str, list[float]]]:
    """Runs `mellama plan` in a fresh process; its output and the GiB columns of its memory rows."""
    # as from a shell: without the TF_CPP_MIN_LOG_LEVEL=1 that importing jax here put into our environment
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "plan", *args]
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no plugin or XLA noise
    rows = {}
    for line in run.stdout.splitlines():
        match = re.fullmatch(r"\s{4,6}(\S.*?)\s{2,}([\d.]+(?:\s+[\d.]+)*)", line)
        if match:
            rows[match.group(1)] = [float(x) for x in match.group(2).split()]
    return run.stdout, rows


@needs_cuda
def test_a_plan_writes_nothing_a_later_plan_cannot_read_from_a_compilation_cache(tmp_path, monkeypatch):
    """With a persistent compilation cache set (as on many clusters), a second plan is as quiet as the first: the
    step compiled for absent devices is not cached (jax could not load it back, and warned on every later plan)."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    for _ in range(2):
        plan_cli.__wrapped__(
            "--config", str(ROOT / "configs" / "tiny.yaml"), "--devices", "8", "--device-kind", "a100-80g"
        )


@needs_cuda
@pytest.mark.parametrize("name, devices", [("me-llama-13b-cpt.yaml", 64), ("me-llama-70b-cpt.yaml", 160)])
def test_each_cpt_config_fits_its_a100s(name, devices):
    out, rows = plan_cli(
        "--config", str(ROOT / "configs" / name), "--devices", str(devices), "--device-kind", "a100-80g"
    )
    assert f"{devices} x a100-80g (NVIDIA A100-SXM4-80GB, {devices // 8} hosts x 8)" in out
    assert "FITS" in out and "DOES NOT" not in out
    compiled, default, estimated = rows["total (peak)"]
    assert compiled * GIB < 80e9
    cfg = config(name)
    params = 4 * 13_015_864_320 / 64 if devices == 64 else 4 * 68_976_648_192 / 32
    assert rows["parameters (fp32)"] == [round(params / GIB, 2)] * 3
    assert rows["AdamW moments (fp32)"] == [round(2 * params / GIB, 2)] * 3
    parts = ("parameters (fp32)", "AdamW moments (fp32)", "batch and step counters", "temporaries")
    assert compiled == pytest.approx(sum(rows[k][0] for k in parts), abs=0.03)
    # The estimate names where the bytes go; it matches the step as XLA schedules it by default within 10 %.
    assert estimated == pytest.approx(default, rel=0.10)
    assert f"{cfg.global_batch} x 4096" in out and "remat full; attention auto (flash on cuda)" in out


@needs_cuda
@pytest.mark.parametrize(
    "name, trainable", [("me-llama-13b-sft-lora.yaml", 62_586_880), ("me-llama-70b-sft-lora.yaml", 207_093_760)]
)
def test_each_sft_config_fits_the_papers_8_h100(name, trainable):
    cfg = config(name)
    assert (cfg.optim.lr, cfg.data.epochs, cfg.lora.rank, cfg.lora.alpha) == (1e-5, 3, 16, 32.0)  # DESIGN §1
    assert len(cfg.lora.targets) == 7
    out, rows = plan_cli("--config", str(ROOT / "configs" / name), "--devices", "8", "--device-kind", "h100-80g")
    assert "8 x h100-80g" in out and "FITS" in out and "DOES NOT" not in out
    assert f"{trainable:,} trainable" in out  # r (in + out) per adapted projection and layer, as test_lora checks
    # the base is frozen: its fp32 weights split 8 ways, and AdamW state for the adapters only (under 2 GiB)
    params = 4 * (13_015_864_320 if "13b" in name else 68_976_648_192) / 8 / GIB
    assert rows["parameters (fp32)"][0] == pytest.approx(params, rel=0.03)  # + adapters, small unsplit tensors
    assert rows["AdamW moments (fp32)"][0] < 2 < params / 2
    assert rows["total (peak)"][0] * GIB < 0.9 * 79.11 * GIB


@needs_cuda
def test_70b_on_160_a100_reports_the_breakdown_speed_and_flags():
    out, rows = plan_cli("--config", str(ROOT / "configs" / "me-llama-70b-cpt.yaml"), "--devices", "160",
                         "--device-kind", "a100-80g")  # fmt: skip
    assert "mesh data 5 x fsdp 32 x tensor 1" in out
    assert "3 micro-batch(es) of 2 sequence(s) per device" in out
    for part in ("gradients (fp32, accumulated)", "remat checkpoints (full)", "temporaries"):
        assert part in rows
    assert rows["gradients (fp32, accumulated)"] == [round(2 * 4 * 68_976_648_192 / 32 / GIB, 2)]
    assert "compiled with mellama's GPU flags (gpu_flags.py)" in out
    # 40 % of an A100's 312 TFLOP/s over 4.284e11 FLOPs per token (6N + attention at T=4096) = 291 tokens/s
    assert "at 40% MFU of 312 TFLOP/s (bf16 peak)" in out and "291 tokens/s per device" in out


@needs_cuda
def test_70b_on_8_a100_does_not_fit_and_says_why():
    lines = "\n".join(report(config("me-llama-70b-cpt.yaml"), 8, "a100-80g"))
    assert "mesh: data=5 fsdp=32 tensor=1 cannot cover 8 devices: planned as data 1 x fsdp 8 x tensor 1" in lines
    assert "DOES NOT FIT" in lines
    assert "parameters + AdamW moments 96.36 GiB" in lines  # 12 bytes x 68,976,648,192 / 8
    assert "the train state alone (fp32 weights, gradients, AdamW moments: 16 bytes per parameter, 128.48 GiB" in lines
    assert re.search(
        r"--devices 32 mesh.data=1 mesh.fsdp=32 mesh.tensor=1 micro_batches=\d+: [\d.]+ GiB compiled, fits", lines
    )


def test_a_mesh_that_does_not_divide_the_model_names_one_that_does():
    cfg = config("me-llama-70b-cpt.yaml", "mesh.data=1", "mesh.fsdp=-1", "global_batch=1024", "micro_batches=16")
    lines = report(cfg, 160, "a100-80g")  # nothing compiled: no cuda extra needed
    assert "  DOES NOT DIVIDE: d_model (embed) 8192 is not a multiple of fsdp 160" in lines
    assert "  DOES NOT DIVIDE: global_batch 1024 is not a multiple of data x fsdp = 160" in lines
    assert "  a layout that divides: mesh.data=5 mesh.fsdp=32 mesh.tensor=1 global_batch=960 (160 x k)" in lines
    lines = report(dataclasses.replace(cfg, global_batch=960, micro_batches=3), 160, None)
    assert "  a layout that divides: mesh.data=5 mesh.fsdp=32 mesh.tensor=1 micro_batches=3" in lines
    assert problems(config("me-llama-70b-cpt.yaml"), layout(config("me-llama-70b-cpt.yaml"), 160)) == []


@needs_cuda
def test_what_helps_is_compiled():
    """13B on 8 A100 at 16 sequences per device: fewer per micro-batch is the first knob, compiled to show it fits."""
    lines = "\n".join(report(config("me-llama-13b-cpt.yaml", "micro_batches=8"), 8, "a100-80g"))
    assert "16 sequence(s) per device" in lines and "DOES NOT FIT" in lines
    assert re.search(r"what helps   micro_batches=16 \(8 per device\): [\d.]+ GiB compiled", lines)
    assert re.search(r"XLA's default GPU schedule .*: [\d.]+ GiB compiled", lines)


def test_search_lists_fitting_layouts_fastest_first():
    model = ModelConfig.llama2_7b(n_layers=2, d_model=512, n_heads=8, n_kv_heads=8, head_dim=64, ffn_dim=1024,
                                  vocab_size=4096)  # fmt: skip
    cfg = TrainConfig(model=model, seq_len=512, global_batch=16, micro_batches=2, mesh=MeshConfig(1, 8, 1))
    lines = report(cfg, 8, "cpu", search=True)  # the same search as for GPUs; CPU compiles are quicker
    start = next(i for i, line in enumerate(lines) if line.startswith("  search"))
    assert re.match(r"  search       \d+ layouts x remat divide the model and batch, \d+ estimated to fit; compiled "
                    r"\d+, 8 fit", lines[start])  # fmt: skip
    table = [line.split() for line in lines[start + 2 :]]
    flops = [float(row[-3]) for row in table]  # PFLOP per device: remat's recompute counted
    assert flops == sorted(flops) and all(float(row[-4]) < hardware.cpu_kind(8).budget / GIB for row in table)
    assert table[0][10] in ("none", "save_dots") and table[0][9] == "1"  # no recompute, one micro-batch: fastest


def test_the_cpu_kind_compiles_on_this_hosts_devices():
    lines = report(config("tiny.yaml", "micro_batches=1"), 8, "cpu")
    header = next(line for line in lines if "per device, GiB" in line)
    assert header.split()[-2:] == ["compiled", "estimate"] and any("FITS" in line for line in lines)


def test_estimate_only_without_a_device_kind():
    lines = "\n".join(report(config("me-llama-13b-cpt.yaml"), 64, None))
    assert "13,015,864,320 parameters" in lines and "--device-kind a100-80g" in lines and "compiled" not in lines


@needs_tpu
@pytest.mark.parametrize("kind, device_kind", [("tpu-v4", "TPU v4"), ("tpu-v5p", "TPU v5"), ("tpu-v5e", "TPU v5 lite")])
def test_tpu_kinds_compile_the_step(kind, device_kind):
    cfg = config("tiny.yaml", "micro_batches=1")
    target = Target(hardware.KINDS[kind], 8)
    lay = layout(cfg, 8)
    assert target.mesh(lay).devices.flat[0].device_kind == device_kind
    assert target.measure(cfg, lay).total > estimate(cfg, lay, "tpu").params


def test_tpu_slices_are_named_as_libtpu_names_them():
    v4, v5e = hardware.KINDS["tpu-v4"], hardware.KINDS["tpu-v5e"]
    assert dev.tpu_topology(v4, 4) == ("v4:2x2x1", (2, 2, 1))
    assert dev.tpu_topology(v4, 128) == ("v4:4x4x8", (2, 2, 1))
    assert dev.tpu_topology(v4, 2) == ("v4:1x1x2", (1, 1, 2))  # one host
    assert dev.tpu_topology(v5e, 16) == ("v5e:4x4", (2, 2, 1))
    assert dev.describe(v4, 128) == "128 x tpu-v4 (TPU v4:4x4x8, 32 hosts x 4)"


def test_the_gpu_flags_are_compiled_in_unless_xla_flags_names_gpu_flags(monkeypatch):
    options = xla_options(hardware.KINDS["a100-80g"])
    assert options["xla_gpu_enable_latency_hiding_scheduler"] is True
    assert options["xla_gpu_all_gather_combine_threshold_bytes"] == 2**28
    assert xla_options(hardware.KINDS["tpu-v4"]) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    assert xla_options(hardware.KINDS["a100-80g"]) is None


def test_without_the_extra_the_error_says_which_to_install(monkeypatch):
    from jax.experimental import topologies

    def missing(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(UserError, match=r"a100-80g: compiling for it needs `pip install 'mellama-jax\[cuda\]'`"):
        dev.compile_only_devices(hardware.KINDS["a100-80g"], 8)


def serve_rows(quantize: str | None) -> tuple[list[str], dict[int, list[str]]]:
    from mellama_jax.planning import serve_plan

    model = config("me-llama-70b-cpt.yaml").model
    lines = serve_plan.report(model, hardware.KINDS["h100-80g"], quantize, 32, 4096, 1)
    rows = {int(line.split()[0]): line.split() for line in lines if re.match(r"\s+\d+\s+tensor", line)}
    return lines, rows


@needs_cuda
def test_serving_70b_bf16_needs_more_than_one_h100_and_int8_names_what_fits():
    lines, rows = serve_rows(None)
    assert "320 KiB per token (bf16), 1.25 GiB per 4096-token slot" in "\n".join(lines)  # 2 x 80 x 8 x 128 x 2 B
    assert sorted(rows) == [1, 2, 4, 8]
    assert float(rows[1][3]) == round(2 * 68_976_648_192 / GIB, 1) == 128.5  # the weights alone, > 80 GB
    assert rows[1][-2] == "no" and rows[8][-2] == "yes"
    assert float(rows[2][3]) == pytest.approx(128.5 / 2, abs=0.1) and float(rows[8][5]) == 5.0  # tensor-parallel
    int8_lines, int8_rows = serve_rows("int8")
    assert 0.5 < float(int8_rows[1][3]) / 128.5 < 0.52  # int8 layer weights + bf16 embedding and head
    fewest = int(re.search(r"fewest\s+(\d+) x h100-80g", "\n".join(int8_lines)).group(1))
    assert fewest == min(n for n, row in int8_rows.items() if row[-2] == "yes")
