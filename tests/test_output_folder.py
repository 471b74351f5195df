"""An --out folder holds one run: no stale file beside a new report, no rerun with other settings or weights read as
the old one, no two writers, and every bad --out refused in one line."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import run_cli

from loopscope.data.tokenizer import load_tokenizer
from loopscope.errors import InputError
from loopscope.experiments.analyze import AnalyzeSettings, run_analyze
from loopscope.experiments.presets import preset_config
from loopscope.models import LoopedLM
from loopscope.models.checkpoint import save_model
from loopscope.output import LOCK, MANIFEST, claim_output


def micro(folder, scale: float = 1.0):
    model = LoopedLM(preset_config("micro+inject", seed=3)).eval()
    with torch.no_grad():
        for p in model.core.parameters():
            p.mul_(scale)
    return save_model(model, folder, load_tokenizer())


def analyze(model, out, **kw) -> AnalyzeSettings:
    base = dict(model=str(model), out=out, recurrences=8, attention_recurrences=2, max_prompts=2, batch_size=2,
                certificate_tokens=2, progress=False)
    s = AnalyzeSettings(**{**base, **kw})
    run_analyze(s)
    return s


def test_a_rerun_with_other_settings_is_refused_and_overwrite_leaves_nothing_stale(tmp_path):
    model, out = micro(tmp_path / "m"), tmp_path / "out"
    analyze(model, out)
    assert (out / "tables" / "certificate.csv").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["settings"]["certificate_tokens"] == 2
    assert manifest["weights"][next(iter(manifest["weights"]))].startswith("sha1:")
    assert "tables/certificate.csv" in manifest["files"] and manifest["versions"]["torch"] == torch.__version__
    with pytest.raises(InputError, match=r"other settings \(certificate_tokens: 2 → 0\).*--overwrite"):
        analyze(model, out, certificate_tokens=0)
    assert (out / "tables" / "certificate.csv").exists()  # a refused run touches nothing
    analyze(model, out, certificate_tokens=0, overwrite=True)
    assert not (out / "tables" / "certificate.csv").exists()  # the first run's table cannot sit beside the new
    assert not any("certificate" in p.name for p in (out / "figures").iterdir())
    assert json.loads((out / MANIFEST).read_text())["settings"]["certificate_tokens"] == 0


def test_a_checkpoint_retrained_in_place_is_refused_under_the_same_settings(tmp_path):
    model, out = micro(tmp_path / "m"), tmp_path / "out"
    analyze(model, out)
    micro(tmp_path / "m", scale=1.5)
    with pytest.raises(InputError, match="other weights .*the checkpoint changed"):
        analyze(model, out)
    analyze(model, out, overwrite=True)
    assert not list((out / "cache").glob("*/batch*.part")) == []  # recomputed into a cleared cache


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    with claim_output(tmp_path, "analyze", {"R": 8}):
        with pytest.raises(InputError, match=r"another loopscope run \(pid \d+, analyze.*\) is writing"):
            with claim_output(tmp_path, "analyze", {"R": 8}):
                pass
    with claim_output(tmp_path, "analyze", {"R": 8}) as folder:  # released on exit: the same settings resume
        folder.finish()
    assert (tmp_path / LOCK).exists()


def test_a_run_refused_for_bad_input_leaves_the_folder_as_it_was(tmp_path):
    """A mistyped option fails after the folder was claimed: the manifest goes back, so the corrected command (other
    settings) is not refused as "a run with other settings"."""
    from loopscope.errors import InputError as Bad

    with pytest.raises(Bad, match="typo"):
        with claim_output(tmp_path, "intervene", {"R": 4}):
            raise Bad("typo")
    assert not (tmp_path / MANIFEST).exists()
    with claim_output(tmp_path, "intervene", {"R": 8}) as folder:
        folder.finish()
    before = (tmp_path / MANIFEST).read_text()
    with pytest.raises(Bad, match="typo"):
        with claim_output(tmp_path, "intervene", {"R": 8}):
            raise Bad("typo")
    assert (tmp_path / MANIFEST).read_text() == before


def test_overwrite_removes_only_what_loopscope_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with claim_output(tmp_path, "grid", {"R": 32}) as folder:
        (tmp_path / "tables").mkdir()
        (tmp_path / "tables" / "cells.csv").write_text("a\n1\n")
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "x.json").write_text("{}")
        folder.finish()
    with claim_output(tmp_path, "grid", {"R": 8}, overwrite=True):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "tables").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, case):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if case == "file" else tmp_path / "f" / "sub"
    code, stdout, err = run_cli(["analyze", "--model", "default", "--out", out, "-r", "8"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err + stdout
    assert ("is a file" in err) if case == "file" else ("cannot be written" in err)


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import loopscope.experiments.analyze as analyze_module

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "figures" / "x.png"))

    monkeypatch.setattr(analyze_module, "write_analysis", full)
    code, stdout, err = run_cli(["analyze", "--model", "default", "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left" in err and "free" in err



def test_every_recorded_model_is_checked_against_the_folders_previous_run(tmp_path):
    """A run with three models (an extrapolate run over three checkpoints): a change of the third is refused too,
    after the first two were recorded unchanged (the previous run's weights are read once at the start, not from
    the manifest this run keeps rewriting)."""
    models = {"a": "sha1:aaaa", "b": "sha1:bbbb", "c": "sha1:cccc"}
    with claim_output(tmp_path, "extrapolate", {"R": 8}) as folder:
        for label, fp in models.items():
            folder.record_weights(label, fp)
        folder.finish()
    with pytest.raises(InputError, match=r"other weights for c \(sha1:cccc, now sha1:dddd\)"):
        with claim_output(tmp_path, "extrapolate", {"R": 8}) as folder:
            folder.record_weights("a", "sha1:aaaa")
            folder.record_weights("b", "sha1:bbbb")
            folder.record_weights("c", "sha1:dddd")
    # refused: the folder's manifest is the previous run's again
    assert json.loads((tmp_path / MANIFEST).read_text())["weights"] == models


def test_a_setting_added_since_a_folders_run_matches_at_its_default_only(tmp_path):
    """A folder written before a setting existed (its manifest does not name it) resumes when the new setting is at
    its default — that run had it — and is refused when it is not (a `reproduce` folder was refused with
    "pretrained: None → False" once `--pretrained` was added)."""
    import dataclasses

    from loopscope.output import settings_of

    @dataclasses.dataclass
    class Old:
        R: int = 8

    @dataclasses.dataclass
    class New:
        R: int = 8
        pretrained: bool = False
        looped: list = dataclasses.field(default_factory=list)

    with claim_output(tmp_path, "reproduce", settings_of(Old())):
        pass
    with claim_output(tmp_path, "reproduce", settings_of(New())):  # the new settings at their defaults: the same run
        pass
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"] == {"R": 8, "pretrained": False, "looped": []}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "settings": {"R": 8}}))
    with pytest.raises(InputError, match="pretrained: None → True"):
        with claim_output(tmp_path, "reproduce", settings_of(New(pretrained=True))):
            pass
    with pytest.raises(InputError, match="R: 8 → 16"):  # a setting the old run named still counts
        with claim_output(tmp_path, "reproduce", settings_of(New(R=16))):
            pass
