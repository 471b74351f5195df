"""Two processes under torchrun (gloo on the CPU) share the batches and give the same tables as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ARGS = ["analyze", "--model", "default", "--max-prompts", "4", "--batch-size", "1", "--recurrences", "16",
        "--attention-recurrences", "4", "--certificate-tokens", "4", "--device", "cpu", "--quiet"]


def run(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_run_equals_one_process_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "loopscope.cli.main", *ARGS, "--out", str(one)], env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "loopscope.cli.main", *ARGS, "--out", str(two)], env)
    tables = sorted(p.name for p in (one / "tables").glob("*.csv"))
    assert tables == sorted(p.name for p in (two / "tables").glob("*.csv")) and len(tables) > 20
    for name in tables:
        a, b = pd.read_csv(one / "tables" / name), pd.read_csv(two / "tables" / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for col in a.columns:
            if col.startswith("seconds"):  # wall time (the certificate's cost per token) differs run to run
                continue
            if pd.api.types.is_numeric_dtype(a[col]):
                np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-12, atol=1e-15,
                                           err_msg=f"{name}:{col}")
            else:
                assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), f"{name}:{col}"
    # each rank ran half of the four batches: the two-process cache holds all four, computed once
    parts = sorted(Path(p).name for p in (two / "cache").rglob("*.part"))
    assert len([p for p in parts if p.startswith("batch")]) == 8  # 4 batches × (states, attention)
    html = (two / "index.html").read_text()
    assert "2 (torch.distributed)" in html
