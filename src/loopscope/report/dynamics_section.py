"""Dynamics section of the report: draws the tables of `loopscope.dynamics` (computed by the caller)."""

from __future__ import annotations

import pandas as pd

from loopscope.report import figures
from loopscope.report.document import Figure, Report, save_csv


def non_finite_note(summary: pd.DataFrame | None) -> str:
    """One sentence for the section's intro when some token's state went non-finite (empty otherwise)."""
    if summary is None or not int(summary["non_finite"].iloc[0]):
        return ""
    row = summary.iloc[0]
    return (f" {int(row['non_finite'])} of {int(row['n'])} tokens went non-finite (inf or NaN), first at recurrence "
            f"{int(row['first_recurrence_min'])} (median {row['first_recurrence_median']:g}): the loop overflowed or a "
            "weight is not finite. Their curves stop there; every finite token is drawn as usual.")


def add_dynamics_sections(report: Report, t: dict[str, pd.DataFrame], recurrences: int, *,
                          floor: float | None = None, floor_note: str = "", behaviour_min_r: int = 8) -> None:
    """Convergence, similarity structure, cyclic fixed points, per-token behaviour, PCA. `floor`: the run's relative
    numerical floor (drawn on the convergence figures, stated in `floor_note`)."""
    out = report.out_dir
    sec = report.section(
        "Convergence of each block layer",
        "Does each layer of the block settle? Blayney et al. (2026) §3.3: the change of a layer's state between "
        "consecutive recurrences (their Fig. 3) and its distance to the long-run state X*ℓ = Xℓ,R (Fig. 4). "
        "Curves falling to the numerical floor mean every layer reaches a fixed point. " + floor_note
        + non_finite_note(t.get("non_finite_summary")),
    )
    if t.get("non_finite_summary") is not None and int(t["non_finite_summary"]["non_finite"].iloc[0]):
        report.table(sec, t["non_finite_summary"], "non_finite_summary",
                     "Tokens whose state went non-finite (inf or NaN), and the recurrences at which they first did; "
                     "per token in tables/non_finite_tokens.csv. Their metrics are NaN from then on.")
        save_csv(t["non_finite_tokens"], out, "non_finite_tokens")
    change = t["successive_change"]
    csv = save_csv(change, out, "successive_change")
    png = figures.quantile_panels(
        change, "recurrence", [("l2", "‖Xℓ,t − Xℓ,t−1‖", None),
                               ("relative", "relative change ‖ΔX‖ / ‖X‖", floor),
                               ("cosine_distance", "1 − cos(Xℓ,t, Xℓ,t−1)", None if floor is None else floor ** 2 / 2)],
        "layer", out, "successive_change", title="Change between consecutive recurrences, per block layer",
        series_label="layer",
    )
    sec.items.append(Figure(png, "Change of each block layer's output from one recurrence to the next: median over "
                                 "tokens (line), inter-quartile band and 10–90 % band, log axis; the dotted line is "
                                 "the run's numerical floor. Falling lines: the layer is converging.", [csv]))
    dist = t["distance_to_fixed_point"]
    csv = save_csv(dist, out, "distance_to_fixed_point")
    png = figures.quantile_panels(
        dist, "recurrence", [("l2", "‖Xℓ,t − X*ℓ‖", None),
                             ("cosine_distance", "1 − cos(Xℓ,t, X*ℓ)", None if floor is None else floor ** 2 / 2)],
        "layer", out, "distance_to_fixed_point",
        title=f"Distance to the state at the last recurrence (R = {recurrences})", series_label="layer",
    )
    sec.items.append(Figure(png, f"Distance of each block layer's state to its own state at recurrence {recurrences} "
                                 "(the approximate fixed point X*ℓ): median and quantile bands over tokens. A cyclic "
                                 "fixed point shows as every layer reaching the floor long before the end.", [csv]))
    report.table(sec, t["cyclic_fixed_point_check"], "cyclic_fixed_point_check",
                 "Proposition 4.1 check: each layer's change between the last two recurrences. Once the block's "
                 "last layer has converged, every layer has: all rows should be small together.")

    sec = report.section(
        "Similarity structure across (layer, recurrence)",
        "Each layer matching itself across recurrences shows as diagonal bands (Blayney et al. Fig. 2 for attention, "
        "Fig. 19 for residual cosine). Computed on the short capture with attention.",
    )
    for name, title, cbar, cmap in (
        ("residual_similarity", "Residual cosine similarity between all (recurrence, layer) states", "cosine",
         "viridis"),
        ("attention_distance", "Attention distance between all (recurrence, layer) pairs",
         "‖A − A′‖_F", "magma_r"),
    ):
        csv = save_csv(t[name], out, name)
        png = figures.heatmap(t[name], out, name, title=title, cbar=cbar, cmap=cmap)
        caption = ("Cosine between the mean token states of every pair; a repeating block pattern means each layer "
                   "returns to the same representation every recurrence." if name == "residual_similarity" else
                   "Distance between attention patterns (all heads); dark off-diagonal bands at multiples of the "
                   "block size mean each layer's heads repeat their pattern every recurrence.")
        sec.items.append(Figure(png, caption, [csv]))
    att = t["attention_to_fixed_point"]
    if att["attention_frobenius_mean"].notna().any():
        csv = save_csv(att, out, "attention_to_fixed_point")
        png = figures.line_panels(att, "recurrence", [("attention_frobenius_mean", "‖Aℓ,t − Aℓ,R‖_F")], "layer", out,
                                  "attention_to_fixed_point", title="Attention distance to the last recurrence",
                                  logy=(True,), series_label="layer")
        sec.items.append(Figure(png, "Head-averaged attention pattern of each block layer against its pattern at the "
                                     "last recurrence of the short capture (Blayney et al. Fig. 23).", [csv]))

    sec = report.section(
        "Cyclic or degenerate fixed point",
        "Blayney et al. Prop. 4.1: a converged block has one fixed point per layer. They are either distinct (a "
        "cycle in latent space) or all equal (degenerate: every layer's update vanishes). The test is the lowest "
        "cosine between layer 0's fixed point and any other layer's (their Fig. 6, right).",
    )
    report.table(sec, t["degeneracy_summary"], "degeneracy_summary", "Verdict over all tokens.")
    save_csv(t["degeneracy"], out, "degeneracy_per_token")

    if "behaviour_dynamics" not in t:
        report.section("Per-token behaviour (skipped)", f"The behaviour detectors read a tail window of at least "
                       f"{behaviour_min_r} recurrences; this run has {recurrences}. Rerun with --recurrences "
                       f"{max(behaviour_min_r, 64)} or more (the paper uses 128) for the fixed-point / orbit / "
                       "slider labels, their co-occurrence and the threshold sweep.")
    else:
        add_behaviour_section(report, t)
    if "certificate" in t:
        add_certificate_section(report, t)
    if "pca_points" not in t:
        return
    sec = report.section(
        "Latent trajectory of one token (PCA)",
        "PCA fitted on every (recurrence, layer) state of the first prompt's last token (Blayney et al. Fig. 5, "
        "Geiping et al. Fig. 12). A cyclic fixed point traces the same closed loop every recurrence.",
    )
    csv1 = save_csv(t["pca_points"], out, "pca_points")
    csv2 = save_csv(t["pca_variance"], out, "pca_variance")
    png = figures.pca_panels(t["pca_points"], t["pca_variance"], out, "pca_trajectory",
                             title="Trajectory of the last token across layers and recurrences")
    sec.items.append(Figure(png, "Points coloured dark→bright by realized depth, one marker per block layer; the red "
                                 "path is the last recurrence.", [csv1, csv2]))


def add_behaviour_section(report: Report, t: dict[str, pd.DataFrame]) -> None:
    """Both detectors side by side, their blind spots, co-occurrence and the threshold sweep."""
    out = report.out_dir
    sec = report.section(
        "Per-token behaviour: fixed point, orbit, slider, divergent",
        "Each token's state at the block's last layer, classified by two detectors. The default reads how the step "
        "size evolves over the tail window (geometric decay = converging, growth = divergent, steady = look at "
        "returns: a period, a quasi-periodic near-return, a straight drift, or noise on a fixed point; a drift that "
        "noise hides step by step is tested over the whole window); its labels do not change with R once a token is "
        "in its asymptotic regime. A token that never moves past its dtype's rounding floor is `at_floor`: a fixed "
        "point as far as the precision can tell, counted with the fixed points in every rate. Every per-token table "
        "names its measurement (estimator, state_precision, floor, recurrences, window, readout). "
        "The paper's App. C heuristic (cosine to "
        "the final state, τ = 0.05, ρ = 0.9; reconstructed: its Algorithm 1 is not public) is shown beside it. "
        "Blind spot of the heuristic, inherent to reading cosines: radial growth and drift away from the origin keep "
        "cos → 1, so exponential growth and sliders read as fixed points there. Blind spot of the default: a "
        "contraction slower than 0.1 % per recurrence, or any trend within 3 standard errors of flat, counts as "
        "steady.",
    )
    counts = t["behaviour_counts"]
    csv = save_csv(counts, out, "behaviour_counts")
    png = figures.grouped_bars(counts, out, "behaviour_counts", title="Tokens per behaviour (block's last layer)",
                               ylabel="tokens")
    sec.items.append(Figure(png, "How many tokens settle to a fixed point, orbit (with a period, or quasi-periodic), "
                                 "slide, diverge, or fit none of these, by each detector.", [csv]))
    save_csv(t["behaviour_dynamics"], out, "behaviour_per_token_dynamics")
    save_csv(t["behaviour_paper"], out, "behaviour_per_token_paper")
    non_fixed = t["behaviour_non_fixed"]
    if len(non_fixed):
        report.table(sec, non_fixed, "behaviour_non_fixed_tokens", "Tokens that are not at a fixed point.", 20)
    if "sensitivity" in t and len(t["sensitivity"]):
        csv = save_csv(t["sensitivity"], out, "behaviour_threshold_sweep")
        png = figures.sweep_panels(t["sensitivity"], out, "behaviour_threshold_sweep",
                                   title="Non-fixed-point rate as each threshold moves (95 % bootstrap over prompts)")
        sec.items.append(Figure(png, "Each panel moves one threshold of one detector over a grid fixed before the run, "
                                     "the others at their defaults (red): how much of a rate is the threshold's "
                                     "choice. Bands: 95 % bootstrap intervals over prompts.", [csv]))
    csv = save_csv(t["cooccurrence"], out, "cooccurrence")
    png = figures.matrix_plot(t["cooccurrence"], out, "cooccurrence", title="Behaviours co-occurring across block "
                              "layers for the same token", cbar="tokens")
    sec.items.append(Figure(png, "Cell (a, b): tokens with behaviour a at one block layer and b at another "
                                 "(Blayney et al. Fig. 14).", [csv]))


def add_certificate_section(report: Report, t: dict[str, pd.DataFrame]) -> None:
    """The stability certificate beside what the detector saw."""
    out = report.out_dir
    cert = t["certificate"]
    timing = t["certificate_timing"].iloc[0]
    sec = report.section(
        "Stability certificate: the block's Jacobian at each token's long-run state",
        "Why does a token settle? The leading eigenvalues of J = ∂F/∂s of one recurrence of the block at the state "
        "after the last recurrence (the injected input held fixed). Causal attention makes the Jacobian block "
        "lower-triangular over tokens, so token i's ρ is the largest |λ| of its prefix's diagonal blocks J_jj, j ≤ i "
        "(its own block's is `rho_own` in the table, the block holding the prefix's is `slowest_token`): an earlier "
        "token's slow mode drives token i too. Each J_jj is estimated by Arnoldi iteration on vector-Jacobian "
        "products, never forming J; `ritz_residual` is ‖J x − λ₁ x‖ of the leading Ritz pair and `converged` says it "
        "is within the tolerance for every block of the prefix (certificate_ritz.csv: every Ritz value with its "
        "residual). ρ = |λ₁| < 1 predicts a "
        "stable fixed point approached at rate ρ per recurrence; ρ ≈ 1 with a complex λ₁ an orbit of period "
        "2π/|arg λ₁|; ρ > 1 divergence. Beside it, what the detector saw on the trajectory, and its measured "
        f"step-size rate. {int(timing['tokens'])} tokens, {timing['seconds_per_token']:.2f} s per token.",
    )
    report.table(sec, t["certificate_agreement"], "certificate_agreement",
                 "Predicted behaviour (rows) against the detector's label (columns); `agree`: the fraction of tokens "
                 "whose label the prediction admits.")
    csv = save_csv(cert, out, "certificate")
    ritz_csv = [save_csv(t["certificate_ritz"], out, "certificate_ritz")] if "certificate_ritz" in t else []
    png = figures.scatter_identity(cert, "rho", "step_rate", "predicted", out, "certificate_rates",
                                   title="Predicted contraction ρ = |λ₁| against the measured step-size rate",
                                   xlabel="ρ = |λ₁| of the block's Jacobian", ylabel="measured step rate e^b")
    sec.items.append(Figure(png, "One point per token. On the diagonal, the linearisation explains the measured "
                                 "convergence; tokens at the numerical floor have no measurable rate of their own. "
                                 "The measured rate is a fit over the tail window, so a token whose steps reach the "
                                 "rounding floor inside that window gets a flattened fit that lies above ρ.",
                            [csv, *ritz_csv]))
