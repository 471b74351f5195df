"""GSM8K loading, the fixed subset, answer extraction, exact match, system-prompt conditions and corpora."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import GSM8K

from loopscope.data.corpus import corpus_documents, encode_documents, pack_sequences, python_docs_documents
from loopscope.data.gsm8k import (
    exact_match,
    exact_match_accuracy,
    extract_answer,
    gsm8k_subset_indices,
    gsm8k_test_subset,
    load_gsm8k,
    normalise_number,
)
from loopscope.data.system_prompts import HUGINN_PERSONA, SYSTEM_PROMPT_CONDITIONS, apply_condition
from loopscope.data.tokenizer import load_tokenizer
from loopscope.errors import InputError

needs_gsm8k = pytest.mark.usefixtures("real_gsm8k")  # fails loudly without the official files


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("#### $1,234.50", "1234.5"),
        ("#### -10", "-10"),
        ("#### 0.50", "0.5"),
        ("#### 18.00", "18"),
        ("#### .5", "0.5"),
        ("#### -0", "0"),
        ("#### 100", "100"),  # not 1E+2
        ("x #### 3\n#### 7 apples\nmore text", "7"),  # the last marker wins; only its line is read
        ("#### 5\nthen 6", "5"),
        ("no marker 42", None),
        ("#### no number here", None),
        ("####\n12", None),  # the number must be on the marker's line
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalise_number_and_exact_match():
    assert normalise_number("The total is $2,125.") == "2125"
    assert normalise_number("nothing") is None
    assert exact_match("so\n#### 2,125", "#### 2125")
    assert exact_match("#### 18.0", "18")
    assert not exact_match("#### 17", "#### 18")
    assert not exact_match(None, "#### 18")
    assert not exact_match("#### x", "#### x")  # two non-answers are not a match
    assert exact_match_accuracy(["#### 1", None, "#### 3", "#### 4"], ["1", "2", "#### 3", "5"]) == 0.5
    with pytest.raises(InputError):
        exact_match_accuracy(["1"], ["1", "2"])


@needs_gsm8k
def test_official_files_load_and_every_reference_has_an_answer():
    test, train = load_gsm8k("test", GSM8K), load_gsm8k("train", GSM8K / "train.jsonl")
    assert (len(test), len(train)) == (1319, 7473)
    assert test[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs")
    assert extract_answer(test[0]["answer"]) == "18"
    answers = [extract_answer(r["answer"]) for r in test]
    assert None not in answers
    assert answers.count("-10") == 1 and "2125" in answers  # a negative and a comma answer survive


@needs_gsm8k
def test_subset_is_fixed_sorted_and_distinct():
    idx = gsm8k_subset_indices()
    assert len(idx) == 256 == len(set(idx))
    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < 1319
    assert idx[:6] == [0, 2, 3, 4, 6, 25] and idx[-3:] == [1305, 1311, 1313]  # pinned: the recorded subset
    assert gsm8k_subset_indices() == idx
    assert gsm8k_subset_indices(seed=1) != idx
    rows = gsm8k_test_subset(GSM8K)
    full = load_gsm8k("test", GSM8K)
    assert [r["index"] for r in rows] == idx
    assert all(full[r["index"]]["question"] == r["question"] for r in rows)


@needs_gsm8k
def test_load_errors_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail: no network, ever
    with pytest.raises(InputError, match="--data"):
        load_gsm8k("test")
    with pytest.raises(InputError, match="split"):
        load_gsm8k("validation", GSM8K)
    with pytest.raises(InputError, match="does not exist"):
        load_gsm8k("test", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(InputError, match="answer"):
        load_gsm8k("test", tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": oops}\n')
    with pytest.raises(InputError, match=r"test.jsonl:3 is not valid JSON .*official GSM8K"):
        load_gsm8k("test", tmp_path)  # the blank line 2 is skipped, the broken line 3 named
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(InputError, match="1319"):
        gsm8k_test_subset(tmp_path)


def test_prompt_files_jsonl_and_text(tmp_path):
    from loopscope.data.prompts import load_prompts

    (tmp_path / "p.jsonl").write_text('{"question": "first"}\n\n{"text": "second"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text('{"question": "first"}\n[1, 2\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "none.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(InputError, match="none of the fields"):
        load_prompts(tmp_path / "none.jsonl")
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(tmp_path / "p.txt", limit=1) == ["one"]


def test_system_prompt_conditions(tokenizer):
    q = "Janet has 3 apples. How many?"
    conds = {name: apply_condition(q, name, tokenizer) for name in SYSTEM_PROMPT_CONDITIONS}
    q_ids = tokenizer(q, add_special_tokens=False)["input_ids"]
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    assert conds["none"] == [bos] + q_ids
    for ids in conds.values():
        assert ids[0] == bos and ids[-len(q_ids):] == q_ids
    persona, padded = conds["long-persona"], conds["long-persona-padded"]
    assert len(padded) == len(persona)  # same length in tokens
    n_sys = len(persona) - 1 - len(q_ids)
    assert n_sys > 100  # the persona is long
    assert padded[1:1 + n_sys] == [pad] * n_sys and pad not in persona
    assert tokenizer.decode(persona[1:1 + n_sys]) == HUGINN_PERSONA + "\n\n"
    assert 1 < len(conds["short-math"]) - len(conds["none"]) < n_sys
    flags = {n: c.reconstructed for n, c in SYSTEM_PROMPT_CONDITIONS.items()}
    assert flags == {"none": False, "long-persona": True, "long-persona-padded": True, "short-math": True}
    # encoding the prefix apart from the question gives the same tokens as encoding them together
    together = tokenizer(HUGINN_PERSONA + "\n\n" + q, add_special_tokens=False)["input_ids"]
    assert persona[1:] == together
    with pytest.raises(InputError, match="unknown"):
        apply_condition(q, "persona", tokenizer)


def test_pack_sequences_by_hand():
    docs = [[1, 5, 6, 2], [1, 7, 2]]  # stream 1 5 6 2 1 7 2
    assert pack_sequences(docs, 3).tolist() == [[1, 5, 6, 2]]
    assert pack_sequences(docs, 2).tolist() == [[1, 5, 6], [2, 1, 7]]
    shuffled = pack_sequences([[1], [2], [3], [4], [5], [6]], 1, shuffle_seed=0)
    assert sorted(shuffled.flatten().tolist()) == [1, 2, 3, 4, 5, 6] and shuffled.dtype == torch.int64
    with pytest.raises(InputError, match="fewer than one sequence"):
        pack_sequences(docs, 10)


def test_corpora(tokenizer):
    enc = encode_documents(["#### 18"], tokenizer)[0]
    assert enc[0] == tokenizer.bos_token_id and enc[-1] == tokenizer.eos_token_id
    docs = corpus_documents("gsm-symbolic:3", seed=0)
    assert len(docs) == 3 and all(extract_answer(d) is not None for d in docs)
    control = python_docs_documents()
    assert len(control) > 50 and not any("####" in d for d in control)
    mixed = corpus_documents("gsm-symbolic:2+python-docs", seed=0)
    assert len(mixed) == 2 + len(control) and mixed[:2] == docs[:2]
    with pytest.raises(InputError, match="gsm-symbolic:N"):
        corpus_documents("gsm-symbolic")
    with pytest.raises(InputError, match="unknown"):
        corpus_documents("wikipedia")
