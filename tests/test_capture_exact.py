"""Capturing must not change the forward: with or without attention (and any extra site), recorded in memory or
streamed, the states and logits equal the uncaptured run's bit for bit, on every family's tiny published-format
checkpoint at R = 32 — the loop would amplify any rounding difference (Huginn-shaped models drifted by 0.17 in
the logits at R = 32 when capture computed its own softmax). Also: precision and device options."""

from __future__ import annotations

import pytest
import torch
from _families_reference import ids, write_huginn, write_ouro, write_retrofit

from loopscope import record
from loopscope.capture.stream import StreamRecorder
from loopscope.errors import InputError
from loopscope.models.device import resolve_device, resolve_dtype
from loopscope.models.load import load_model

R = 32
WRITERS = {"ouro": write_ouro, "huginn": write_huginn, "retrofit": write_retrofit}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def family_model(request, tmp_path_factory):
    path = WRITERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")
    path = path[0] if isinstance(path, tuple) else path
    return load_model(path).model


def plain_states(model, x):
    """States of an uncaptured forward, read by a hook that only copies (no pattern listener): the reference."""
    got = {}
    with StreamRecorder(model, {"resid_post"}, lambda site, step, t: got.__setitem__(step, t.clone())):
        logits = model(x, recurrences=R)
    return got, logits


@torch.no_grad()
def test_attention_capture_leaves_states_and_logits_bit_identical(family_model):
    x = ids(2, 9)
    logits_alone = family_model(x, recurrences=R)
    states, logits = plain_states(family_model, x)
    assert torch.equal(logits, logits_alone)
    traj = record(family_model, x, recurrences=R, attention=True, sites=["attn_in", "mlp_post"])
    assert torch.equal(traj.logits, logits_alone)
    for (seg, t, j), value in states.items():
        if seg == "core":
            assert torch.equal(traj.core[t, j], value), (t, j)
    streamed = {}
    with StreamRecorder(family_model, {"resid_post", "pattern", "attn_in"},
                        lambda site, step, t: streamed.__setitem__((site, step), t.clone())):
        logits_streamed = family_model(x, recurrences=R)
    assert torch.equal(logits_streamed, logits_alone)
    assert all(torch.equal(streamed[("resid_post", k)], v) for k, v in states.items())
    # the probabilities recorded beside the kernel are the layer's attention: rows sum to 1, causal
    a = traj.core_attention[R - 1, 0]
    assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5) and float(a.triu(1).abs().max()) == 0.0


def test_extra_sites_are_labelled_and_named(family_model):
    x = ids(1, 7)
    traj = record(family_model, x, recurrences=3, sites=["attn_in", "mlp_post", "attn_out"])
    cfg = family_model.cfg
    assert traj.sites["mlp_post"]["core"].shape == (3, cfg.n_block, 1, 7, cfg.d_mlp)
    assert traj.get("attn_in", "core", 2, 0).shape == (1, 7, cfg.d_model)
    # resid_mid = resid_pre + attn_out for pre-norm layers; checked where the family is pre-norm (retrofit)
    if cfg.norm == "pre":
        traj2 = record(family_model, x, recurrences=3, sites=["attn_out", "resid_mid"])
        block_input = traj2.injected[1]  # layer 0's input at recurrence 1
        torch.testing.assert_close(traj2.get("resid_mid", "core", 1, 0),
                                   block_input + traj2.get("attn_out", "core", 1, 0))
    with pytest.raises(InputError, match="unknown sites"):
        record(family_model, x, recurrences=2, sites=["mlp_pre"])
    with pytest.raises(InputError, match="no mlp_post"):
        record(family_model, x, recurrences=2).get("mlp_post", "core", 0, 0)


def test_names_filter_selects_sites_like_transformerlens(family_model):
    traj = record(family_model, ids(1, 5), recurrences=2, sites=lambda name: name.endswith("mlp.hook_post"))
    assert list(traj.sites) == ["mlp_post"]


def test_trajectory_docstring_documents_every_field():
    from loopscope import Trajectory

    doc = Trajectory.__doc__
    for name in ("core", "injected", "prelude", "coda", "embed", "core_attention", "exit_gate", "logits",
                 "token_ids", "tokens", "mask", "sites", "metadata", "[R, K, B, T, D]", "get("):
        assert name in doc, name


def test_low_precision_weights_keep_a_float32_stream(tmp_path):
    """Ouro's tiny checkpoint is stored in bfloat16: loaded as bfloat16, no float32 copy of any weight is made, the
    weights stay bfloat16 and the residual stream (the recurrent state) is float32 unless asked otherwise."""
    path = write_ouro(tmp_path / "o")
    path = path[0] if isinstance(path, tuple) else path
    made_float32 = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.dtype == torch.float32 and self.dtype == torch.bfloat16 and self.numel() > 64:
            made_float32.append(tuple(self.shape))
        return out

    torch.Tensor.to = spy
    try:
        loaded = load_model(path, dtype="bfloat16")
    finally:
        torch.Tensor.to = real_to
    assert made_float32 == [], f"weights copied to float32 while loading: {made_float32[:3]}"
    model = loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.stream_dtype == torch.float32
    traj = record(model, ids(1, 6), recurrences=4)
    assert traj.metadata["state_dtype"] == "float32"
    bf16 = load_model(path, dtype="bf16", state_dtype="weights").model
    assert bf16.stream_dtype == torch.bfloat16


def test_device_and_dtype_options_refuse_what_is_not_there():
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda:1")
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="not a device"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="not a dtype"):
        resolve_dtype("int8")
    assert resolve_dtype("bf16") == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", [["analyze"], ["compare", "default", "smollm2"], ["intervene", "--zero-mlp",
                                     "core:0"], ["grid", "--quick"], ["conditions"], ["extrapolate"], ["reproduce"],
                                     ["train", "--steps", "1"]])
def test_cli_device_cuda_without_cuda_is_one_error_line(command, tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli([*command, "--device", "cuda", "--out", tmp_path / "o"], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error: --device cuda: no CUDA device"), err


@pytest.mark.parametrize("command", [["analyze"], ["compare", "default", "smollm2"], ["intervene", "--zero-mlp",
                                     "core:0"], ["grid", "--quick"], ["conditions"], ["extrapolate"]])
def test_cli_threads_option_is_checked_and_applied(command, tmp_path, capsys):
    """Every command that runs a model takes --threads; a bad count is one error line, exit 2, before any work."""
    from conftest import run_cli

    code, _, err = run_cli([*command, "--threads", "0", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.strip() == "error: --threads 0: give 1 or more CPU threads", err
    assert not (tmp_path / "o").exists()


def test_apply_threads_sets_torch_threads():
    from loopscope.cli.common import apply_threads

    before = torch.get_num_threads()
    try:
        apply_threads(3)
        assert torch.get_num_threads() == 3
        apply_threads(None)  # not given: left as it is
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
