"""JAX's persistent compilation cache under the commands that run a model (compile_cache.py): a second process
loads what the first compiled; an unusable folder or a damaged entry is one warning line and a normal run."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
from test_convert_cli import write_tokenizer
from test_hf_parity import BASE, CONFIGS, reference_model

from mellama_jax.hf.convert import convert_hf_to_jax

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("compile_cache")
    reference_model(dataclasses.replace(BASE, **CONFIGS["gqa"])).save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    convert_hf_to_jax(root / "hf", root / "ckpt")
    return root / "ckpt"


def generate(ckpt: pathlib.Path, cache: str, *flags: str) -> subprocess.CompletedProcess:
    """`mellama generate` in a fresh process with MELLAMA_COMPILE_CACHE=cache."""
    # every program cached, however quick to compile (the default skips those under 0.1 s): JAX's own variable
    env = {**os.environ, "MELLAMA_COMPILE_CACHE": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    argv = [sys.executable, "-m", "mellama_jax.cli", "generate", str(ckpt), "--prompt", "w5 w7", "--max-new-tokens",
            "4", *flags]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def tally(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if " compiled " in line]
    return line


def test_a_second_process_loads_what_the_first_compiled_and_a_damaged_entry_is_compiled_again(ckpt, tmp_path):
    cache = tmp_path / "cache"
    first, second = generate(ckpt, str(cache)), generate(ckpt, str(cache))
    assert ", 0 loaded from the cache" in tally(first)
    programs = tally(first).split("compiled ")[1].split(" ")[0]
    assert f"compiled {programs} programs" in tally(second) and f", {programs} loaded from the cache" in tally(second)
    assert second.stdout == first.stdout

    for entry in cache.glob("*-cache"):  # cut short, as a process killed while writing would leave them
        entry.write_bytes(entry.read_bytes()[:100])
    damaged = generate(ckpt, str(cache))
    warnings = [line for line in damaged.stderr.splitlines() if "WARNING" in line or "Warning" in line]
    assert len(warnings) == 1 and "an entry could not be read, compiling it afresh" in warnings[0], damaged.stderr
    assert ", 0 loaded from the cache" in tally(damaged) and damaged.stdout == first.stdout


def test_an_unwritable_folder_is_one_warning_and_off_means_off(ckpt, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = generate(ckpt, str(blocker / "cache"))
    (warning,) = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert "cannot be written" in warning and str(blocker) in warning
    assert "loaded from the cache" not in tally(result)

    for env, flags in (("off", ()), (str(tmp_path / "unused"), ("--no-compile-cache",))):
        result = generate(ckpt, env, *flags)
        assert "compilation cache off" in result.stderr and "loaded from the cache" not in tally(result)
    assert not (tmp_path / "unused").exists()


def test_jax_failing_to_write_or_read_an_entry_is_one_line_of_ours_per_kind(caplog, monkeypatch):
    import logging
    import warnings

    from mellama_jax import compile_cache

    shown = []  # what reaches Python's own printing; a hook an earlier command installed here is set aside
    monkeypatch.setattr(warnings, "showwarning", lambda message, *_: shown.append(str(message)))
    log = logging.getLogger("mellama_jax.test_compile_cache")
    compile_cache._warn_in_one_line(log)
    with caplog.at_level(logging.WARNING, logger=log.name), warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(2):  # a full disk: JAX's own words, as jax/_src/compiler.py warns them
            warnings.warn("Error writing persistent compilation cache entry for 'jit_f': OSError: [Errno 28] No "
                          "space left on device", stacklevel=1)  # fmt: skip
            warnings.warn("Error reading persistent compilation cache entry for 'jit_f': ZstdError: truncated",
                          stacklevel=1)  # fmt: skip
        warnings.warn("another warning", stacklevel=1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert shown == ["another warning"]
    assert "could not be written" in lines[0] and "No space left on device" in lines[0]
    assert "could not be read" in lines[1] and "truncated" in lines[1]
