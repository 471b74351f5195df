"""The streaming analysis on an accelerator against the same analysis on the CPU, table by table (issue 21).

    python benchmarks/device_agreement.py --device cuda            # `default`, 8 GSM-Symbolic prompts, R = 32

The accumulators reduce where the states are (float64 sums on the device) and hand the host one Part per batch;
this runs `experiments.analyze.analyse` on the CPU and on `--device` with the same model and prompts and prints,
for every table, the largest difference of each numeric column relative to the column's scale, and the share of
equal labels (per-token behaviour, degeneracy verdict). The forwards themselves differ by float32 rounding
between devices (different kernels, ~1e-7 per operation), so agreement is expected to that order, amplified by the
loop's own sensitivity (ρ^t), not bit for bit. Prints one JSON line (and writes it to `--json`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def tables_of(device: str, a: argparse.Namespace) -> tuple[dict, float]:
    import torch

    from loopscope.data.prompts import load_prompts
    from loopscope.experiments.analyze import AnalyzeSettings, analyse
    from loopscope.models.load import load_model

    torch.manual_seed(0)
    loaded = load_model(a.model, device=device)
    prompts = load_prompts(a.prompts, a.max_prompts)
    s = AnalyzeSettings(model=a.model, out=Path(tempfile.mkdtemp()), recurrences=a.recurrences,
                        attention_recurrences=a.attention_recurrences, progress=False, certificate_tokens=0,
                        batch_size=a.batch_size)
    start = time.perf_counter()
    result = analyse(loaded, prompts, s)
    seconds = time.perf_counter() - start
    tables = dict(result.dynamics or {})
    tables["stages"] = result.stages
    return tables, seconds


def compare(cpu: dict, dev: dict) -> dict:
    import numpy as np
    import pandas as pd

    out = {}
    for name, a in cpu.items():
        b = dev.get(name)
        if not isinstance(a, pd.DataFrame) or b is None:
            continue
        entry: dict = {"rows": [len(a), len(b)]}
        if a.shape != b.shape:
            out[name] = {**entry, "error": f"shape {a.shape} vs {b.shape}"}
            continue
        worst, where = 0.0, None
        for col in a.columns:
            x, y = a[col], b[col]
            if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
                xv, yv = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
                both = np.isfinite(xv) & np.isfinite(yv)
                if (np.isfinite(xv) != np.isfinite(yv)).any():
                    entry.setdefault("finite_mismatch", []).append(str(col))
                if both.any():
                    scale = max(float(np.abs(xv[both]).max()), 1e-30)
                    d = float(np.abs(xv[both] - yv[both]).max()) / scale
                    if d > worst:
                        worst, where = d, str(col)
            else:
                entry.setdefault("label_agreement", {})[str(col)] = float((x.astype(str) == y.astype(str)).mean())
        entry.update(max_relative_difference=worst, column=where)
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", default="gsm-symbolic")
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument("--recurrences", "-r", type=int, default=32)
    ap.add_argument("--attention-recurrences", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    cpu, cpu_s = tables_of("cpu", a)
    dev, dev_s = tables_of(a.device, a)
    result = {"device": a.device, "model": a.model, "recurrences": a.recurrences, "cpu_s": cpu_s, "device_s": dev_s,
              "tables": compare(cpu, dev)}
    line = json.dumps(result)
    print(line, flush=True)
    if a.json is not None:
        a.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
