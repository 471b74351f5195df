"""The Jacobian lens: closed forms on linear recurrences, the streamed fit against dense Jacobians of stored states,
the final state's lens against the logit lens, and the affine lens on an exactly affine map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopscope.experiments.jacobian_lens import AffineLensFit, JacobianLensFit, looped_site_forward
from loopscope.labels import Step


def linear_forward(A: torch.Tensor, C: torch.Tensor, R: int):
    """h_{r+1,t} = A h_{r,t} + C h_{r,t−1} (causal mixing with the previous token); states Step("core", r, 0) =
    h_{r+1}; final = h_R. ids is the initial state h_0 itself (B, T, D)."""

    def run(h0: torch.Tensor, mask: torch.Tensor):
        h = h0.detach().requires_grad_(True)
        states = {}
        for r in range(R):
            prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            h = h @ A.T + prev @ C.T
            states[Step("core", r, 0)] = h
        return h, states

    return run


def padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_closed_form_powers_of_a_per_token_linear_map():
    gen = torch.Generator().manual_seed(0)
    D, R = 5, 4
    A = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.4
    fit = JacobianLensFit(D)
    fit.update(linear_forward(A, torch.zeros(D, D, dtype=torch.float64), R),
               torch.randn(2, 6, D, generator=gen, dtype=torch.float64), padded_mask([6, 3], 6))
    J = fit.finish()
    for r in range(R):  # ∂h_R/∂h_{r+1} = A^(R−1−r), the same for every token
        torch.testing.assert_close(J[Step("core", r, 0)].double(), torch.linalg.matrix_power(A, R - 1 - r),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("probes", [None, 4])
def test_closed_form_with_causal_mixing_and_padding(probes):
    # one step back: Σ_{t'≥t} ∂h_R,t'/∂h_{R−1},t = A + C for every real token but the prompt's last (only A), so the
    # mean over real tokens is A + C·(n_b − 1)/n_b, and over prompts A + C·mean_b((n_b − 1)/n_b). Pads (after the
    # real tokens) do see the last real token through C: counting them would add C to it.
    gen = torch.Generator().manual_seed(1)
    D, R = 4, 3
    A = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.5
    C = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.5
    lengths = [7, 4, 2]
    fit = JacobianLensFit(D, probes)  # probes = D: random orthonormal probes, exact as well
    fit.update(linear_forward(A, C, R), torch.randn(3, 7, D, generator=gen, dtype=torch.float64),
               padded_mask(lengths, 7))
    expected = A + C * np.mean([(n - 1) / n for n in lengths])
    torch.testing.assert_close(fit.finish()[Step("core", R - 2, 0)].double(), expected, rtol=1e-5, atol=1e-6)


def micro(no_coda: bool = False):
    from loopscope.experiments.presets import preset_config
    from loopscope.models.looped import LoopedLM

    torch.manual_seed(0)
    return LoopedLM(preset_config("micro+noprelude" if no_coda else "micro", seed=3)).double().eval()


def test_streamed_fit_equals_dense_jacobians_of_stored_states():
    model = micro()
    R = 3
    prompts = [torch.tensor([[5, 17, 3, 99, 41]]), torch.tensor([[8, 2, 250]])]
    fit = JacobianLensFit(model.cfg.d_model)
    forward = looped_site_forward(model, R)
    for ids in prompts:  # one batch at a time: the streamed fit
        fit.update(forward, ids, torch.ones_like(ids, dtype=torch.bool))
    J = fit.finish()
    for site in (Step("prelude", 0, 0), Step("core", 0, 1), Step("core", 2, 0), Step("coda", 0, 0)):
        dense = []
        for ids in prompts:
            with torch.no_grad():
                _, stored = forward(ids, torch.ones_like(ids, dtype=torch.bool))
            x0 = stored[site].detach()

            def final_from(x, ids=ids):  # the rest of the forward, from the state at `site` replaced by x
                def swap(module, args, kwargs, out):
                    return x if kwargs["step"] == site else out

                points = model.site_points("resid_post")
                handles = [p.register_forward_hook(swap, with_kwargs=True) for p in points]
                try:
                    final, _ = forward(ids, torch.ones_like(ids, dtype=torch.bool))
                finally:
                    for h in handles:
                        h.remove()
                return final

            full = torch.autograd.functional.jacobian(final_from, x0)[0, :, :, 0]  # (T', D, T, D)
            dense.append(full.sum(0).mean(1))  # Σ_t' then mean over t: (D, D)
        torch.testing.assert_close(J[site].double(), torch.stack(dense).mean(0), rtol=1e-4, atol=1e-6)


def test_final_state_lens_is_the_logit_lens():
    from loopscope.experiments.stage_tables import looped_readout
    from loopscope.stages.jacobian_lens import lens_rows

    ids = torch.tensor([[5, 17, 3, 99, 41], [8, 2, 250, 0, 0]])
    mask = padded_mask([5, 3], 5)
    for no_coda, last in ((True, Step("core", 2, 1)), (False, Step("coda", 0, 0))):
        model = micro(no_coda)
        forward = looped_site_forward(model, 3)
        fit = JacobianLensFit(model.cfg.d_model)
        fit.update(forward, ids, mask)
        J = fit.finish()
        torch.testing.assert_close(J[last].double(), torch.eye(model.cfg.d_model, dtype=torch.float64))
        with torch.no_grad():
            final, states = forward(ids, mask)
        rows = lens_rows(looped_readout(model), final, {last: states[last]}, mask,
                         {"logit": None, "jacobian": {last: J[last].double()}})
        logit, jac = rows[:2], rows[2:]
        for a, b in zip(logit, jac):
            assert a["top1_agreement"] == b["top1_agreement"] == 1.0
            assert abs(a["kl_to_final"] - b["kl_to_final"]) < 1e-6 and b["final_top1_rank"] == 0


def test_affine_lens_recovers_an_exact_affine_map():
    gen = torch.Generator().manual_seed(2)
    D = 3
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 40, D, generator=gen, dtype=torch.float64)
    fit = AffineLensFit()
    fit.update(h @ A.T + b, {Step("core", 0, 0): h}, torch.ones(2, 40, dtype=torch.bool))
    A_hat, b_hat = fit.finish()[Step("core", 0, 0)]
    torch.testing.assert_close(A_hat.double(), A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_hat.double(), b, rtol=1e-4, atol=1e-4)


def test_lens_section_on_a_looped_model(tmp_path):
    from loopscope.data.tokenizer import load_tokenizer
    from loopscope.experiments.jacobian_lens import agreement_at_last_recurrence, fit_and_read_lenses, lens_views
    from loopscope.models.load import LoadedModel
    from loopscope.report import Report
    from loopscope.report.lens_section import add_lens_section

    loaded = LoadedModel(micro().float(), load_tokenizer(), "micro", "looped", 2)
    summary, rows, info = fit_and_read_lenses(loaded, ["Tom has 3 apples.", "A train leaves at noon.",
                                                       "She buys 4 pens.", "Add 5 and 7."], 3)
    assert set(rows["batch"]) == {2, 3} and info["fit prompts"] == 2  # fitted on two prompts, read on the others
    assert set(summary["lens"]) == {"logit", "jacobian", "affine"}
    assert len(summary) == 3 * (1 + 3 * 2 + 1)  # every state: prelude, 3 recurrences × 2 block layers, coda
    last = summary[(summary.segment == "coda") & (summary.lens != "affine")]  # affine: 2 prompts < D + 1 tokens
    assert (last["top1_agreement_mean"] == 1).all() and (last["final_top1_rank_mean"] == 0).all()
    views = lens_views(summary)
    assert views["top1_agreement|jacobian"].shape == (3, 2)  # recurrence × block layer
    report = Report(title="t", out_dir=tmp_path)
    add_lens_section(report, summary, views, agreement_at_last_recurrence(summary), info, "micro")
    report.write()
    assert (tmp_path / "figures" / "lens_heatmaps.png").exists()
    assert (tmp_path / "tables" / "lens_comparison.csv").exists()


def test_sketch_with_fewer_probes_is_unbiased():
    # k < D random orthonormal probes: E[(D/k) Q Qᵀ] = I, so the mean of many sketches is J; one sketch is not
    gen = torch.Generator().manual_seed(4)
    D, R = 6, 2
    A = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.5
    forward = linear_forward(A, torch.zeros(D, D, dtype=torch.float64), R)
    h0, mask = torch.randn(1, 3, D, generator=gen, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    sketches = []
    for seed in range(400):
        fit = JacobianLensFit(D, probes=2, seed=seed)
        fit.update(forward, h0, mask)
        sketches.append(fit.finish()[Step("core", 0, 0)].double())
    sketches = torch.stack(sketches)
    assert (sketches[0] - A).abs().max() > 0.2  # a single 2-of-6 sketch is far off
    torch.testing.assert_close(sketches.mean(0), A, rtol=0, atol=0.12)


def test_lens_options_are_refused_in_one_line():
    from loopscope.errors import InputError
    from loopscope.experiments.analyze import AnalyzeSettings

    for bad in (dict(lens_probes=0), dict(lens_prompts=-1)):
        with pytest.raises(InputError, match="--lens-"):
            AnalyzeSettings(**bad).check()
    with pytest.raises(InputError, match="choose 1..3"):
        JacobianLensFit(3, probes=4)
