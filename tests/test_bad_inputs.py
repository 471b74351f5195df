"""Inputs a new user gives that were accepted and quietly misread (../shared/reference/bad-inputs.md): each is now
one line on stderr, exit 2, before any heavy work — or handled as meant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build, run_cli

from loopscope.capture import capture
from loopscope.data.prompts import load_prompts
from loopscope.errors import InputError

DEFAULT_WEIGHTS = Path(__file__).parents[1] / "src/loopscope/models/assets/default/model.safetensors"


def one_line(args, capsys, *needles):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, err
    for needle in needles:
        assert needle in err, (needle, err)


def prompt_file(tmp_path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name, content, needle", [
    ("q.jsonl", '{"question": "fine"}\n{"question": null}\n', "q.jsonl:2: 'question' is null"),
    ("q.jsonl", '{"question": 42}\n', "q.jsonl:1: 'question' is a number (42), not text"),
    ("q.csv", "question,answer\nWhat is 2+2?,4\n", "suffix '.csv'"),
    ("q.txt", bytes(range(128, 256)) * 8, "is not UTF-8 text"),
])
def test_prompt_files_that_were_misread(tmp_path, capsys, name, content, needle):
    path = prompt_file(tmp_path, name, content)
    one_line(["analyze", "--prompts", path, "--out", tmp_path / "o"], capsys, needle)
    assert not (tmp_path / "o").exists()  # refused before the output folder was touched


def test_a_prompt_folder_and_counts_below_one(tmp_path, capsys):
    one_line(["analyze", "--prompts", tmp_path, "--out", tmp_path / "o"], capsys, "is a folder")
    for n in ("-1", "0"):  # -1 ran 15 of 16 prompts (a Python slice); 0 blamed the prompt set
        one_line(["analyze", "--max-prompts", n, "--out", tmp_path / "o"], capsys, f"--max-prompts {n}: give")
    with pytest.raises(InputError, match="--max-prompts -2"):
        load_prompts("gsm-symbolic", limit=-2)


def test_recurrences_must_be_whole_and_bounded(tmp_path, capsys, token_ids):
    one_line(["analyze", "-r", "1000000000", "--out", tmp_path / "o"], capsys, "give 1..100,000 recurrences")
    model = build()
    with pytest.raises(InputError, match=r"recurrences=2.5: give a whole number"):
        capture(model, token_ids, recurrences=2.5)  # ran 2 recurrences before
    with pytest.raises(InputError, match=r"recurrences=2.5"):
        model(token_ids, recurrences=2.5)
    assert capture(model, token_ids, recurrences=torch.tensor(3)).core.shape[0] == 3  # a 0-d integer tensor is fine


def test_a_sparse_hf_config_is_refused_before_any_tensor_is_allocated(tmp_path, capsys):
    """`{"model_type": "llama"}` beside any weights: transformers' defaults made a 7 B Llama and the machine ran out
    of its 24 GB; now the config's parameter count is compared with the weights' on the meta device."""
    folder = tmp_path / "sparse"
    folder.mkdir()
    shutil.copy(DEFAULT_WEIGHTS, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line(["analyze", "--model", folder, "--out", tmp_path / "o", "-r", "8"], capsys,
             "describes a model of 6,738.4 M parameters but its weights hold 1.7 M", "lacks vocab_size, hidden_size")
