"""benchmarks/gpu_scale.py at a reduced width on the CPU: the script the accelerator run uses works end to end, its
model has Huginn-0125's layout, and its figures are what they say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_scale.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_benchmark_runs_on_a_cpu_at_reduced_width(tmp_path):
    gpu = load_script()
    out = tmp_path / "gpu.json"
    r = gpu.main(["--device", "cpu", "--width", "96", "--heads", "1", "--vocab", "1024", "--tokens", "12",
                  "--prompts", "2", "-r", "6", "--attention-recurrences", "2", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["device"] == "cpu" and r["weights"] == "bfloat16" and r["state"] == "float32"
    assert r["d_mlp"] == int(96 * 17920 / 5280) and r["heads"] == 1  # Huginn's MLP ratio at this width
    assert 12 <= r["tokens_per_prompt"] <= 14  # the prompts are the length asked for (+ BOS)
    assert r["finals_max_abs_diff"] == 0.0  # the second pass reproduced the first: distances to X* are exact
    assert r["ratio"] == pytest.approx(r["analysis_s"] / r["plain_forwards_s"])  # one repeat: the ratio itself
    assert r["paper_questions_s"] == pytest.approx(r["analysis_s"] * 256 / 2)
    model = gpu.huginn_shaped(96, 1, None, 1024, "cpu", "bfloat16").model
    assert (model.cfg.n_prelude, model.cfg.n_block, model.cfg.n_coda) == (2, 4, 2)
    assert (model.cfg.norm, model.cfg.injection, model.cfg.state_init) == ("sandwich", "concat", "random")
    assert gpu.HUGINN_0125 == {"d_model": 5280, "n_heads": 55, "d_mlp": 17920, "vocab_size": 65536}
