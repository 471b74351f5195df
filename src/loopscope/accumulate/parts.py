"""A batch's Part as bytes and as a file: one safetensors container, never pickle.

A Part is a nested dict whose leaves are tensors, pandas DataFrames or JSON values. Tensors (and the numeric
columns of DataFrames) go into the safetensors body; the tree, JSON leaves and non-numeric columns (token strings,
labels) go into its header metadata as JSON. `decode_part(encode_part(p))` returns an equal Part: same dtypes,
same values bit for bit, the same column order and nullable integer columns.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loopscope.errors import InputError

FORMAT = "loopscope-part/1"


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, pd.DataFrame):
        columns = []
        for name in value.columns:
            col = value[name]
            entry: dict[str, Any] = {"name": str(name)}
            if isinstance(col.dtype, pd.Int64Dtype):
                key = f"t{len(tensors)}"
                tensors[key] = torch.from_numpy(col.fillna(0).to_numpy(dtype=np.int64).copy())
                tensors[key + "m"] = torch.from_numpy(col.isna().to_numpy().copy())
                entry.update(kind="Int64", key=key)
            elif col.dtype.kind in "biuf":
                key = f"t{len(tensors)}"
                tensors[key] = torch.from_numpy(np.array(col.to_numpy(), copy=True))
                entry.update(kind="numeric", key=key)
            else:
                entry.update(kind="json", dtype=str(col.dtype),
                             values=[None if (isinstance(v, float) and np.isnan(v)) else v for v in col.tolist()])
            columns.append(entry)
        return {"__frame__": columns, "index_name": value.index.name, "n": len(value)}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _flatten(v, f"{prefix}/{k}", tensors) for k, v in value.items()}}
    return {"__json__": value}


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__frame__" in node:
        data = {}
        for entry in node["__frame__"]:
            if entry["kind"] == "Int64":
                arr = pd.array(tensors[entry["key"]].numpy(), dtype="Int64")
                arr[tensors[entry["key"] + "m"].numpy()] = pd.NA
                data[entry["name"]] = arr
            elif entry["kind"] == "numeric":
                data[entry["name"]] = tensors[entry["key"]].numpy()
            else:
                data[entry["name"]] = pd.Series(entry["values"], dtype=entry.get("dtype", "object"))
        frame = pd.DataFrame(data, index=pd.RangeIndex(node["n"]))
        frame.index.name = node.get("index_name")
        return frame
    if "__dict__" in node:
        return {k: _unflatten(v, tensors) for k, v in node["__dict__"].items()}
    return node["__json__"]


def encode_part(part: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(part, "", tensors)
    if not tensors:
        tensors["empty"] = torch.zeros(0)
    return st_save(tensors, metadata={"format": FORMAT, "tree": json.dumps(tree)})


def decode_part(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise InputError("a cached batch result is truncated; delete the cache folder and rerun")
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise InputError(f"a cached batch result has format {meta.get('format')!r}, not {FORMAT}; delete the cache")
    return _unflatten(json.loads(meta["tree"]), st_load(blob))
