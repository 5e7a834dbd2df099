"""PNG plots of dials.spread_correct: edge shifts with and without the correction, the fit's
terms per epoch, the learned correction (stencil, gain nodes, head coefficients), the posterior predictive check,
residual maps before and after."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_dials.plots.figures import pyplot, save_figure

__all__ = ["plot_edge_shift_arms", "plot_loss", "plot_correction", "plot_predictive", "plot_residual_maps"]


def plot_edge_shift_arms(rows: list[dict], pairs: list[dict], path: str | Path) -> Path:
    """Per site (and site pair) the physics-only and the corrected edge shift with 68/95 %
    intervals, per site also the corrected interval given the spectrometer's calibration (the
    offset latent held: what inter-site differences see), and the truth where known."""
    plt = pyplot()
    items = [(r["site"], r["physics_edge_shift_eV"], r["physics_sigma_eV"], r["edge_shift_eV"], r["sigma_eV"],
              r.get("sigma_given_calibration_eV"), r.get("truth_edge_shift_eV")) for r in rows]  # fmt: skip
    items += [(f"{p['site_a']} - {p['site_b']}", p["physics_difference_eV"], p["physics_sigma_eV"], p["difference_eV"],
               p["sigma_eV"], None, None) for p in pairs]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 1.8 + 0.9 * len(items)))
    labelled = set()
    for i, (_, pv, ps, cv, cs, calibrated, truth) in enumerate(items):
        arms = [(0.22, pv, ps, "C7", "physics only"), (0.0, cv, cs, "C0", "corrected")]
        if calibrated is not None:
            arms.append((-0.22, cv, calibrated, "C2", "corrected, given the spectrometer's calibration"))
        for offset, value, sd, colour, name in arms:
            y = i + offset
            ax.plot([value - 1.96 * sd, value + 1.96 * sd], [y, y], color=colour, lw=2)
            ax.plot([value - sd, value + sd], [y, y], color=colour, lw=6, label=None if name in labelled else name)
            ax.plot([value], [y], "o", color="k", ms=3)
            labelled.add(name)
        if truth is not None:
            ax.plot([truth], [i], "x", color="C3", ms=10, label=None if "truth" in labelled else "truth")
            labelled.add("truth")
    ax.set_yticks(range(len(items)), [it[0] for it in items])
    ax.set_ylim(-0.7, len(items) - 0.3)
    ax.set_xlabel("edge shift / difference (eV); bars 68/95 %")
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)  # below the axes, clear of the bars
    fig.tight_layout(rect=(0.0, 0.16, 1.0, 1.0))
    return save_figure(fig, path, dpi=110)


def plot_loss(history: list[dict], path: str | Path) -> Path:
    """The NLL, beta-weighted anchor and prior after each epoch (relative to the first NLL)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes, ("nll", "kl", "prior")):
        values = np.array([h[key] for h in history])
        ax.plot(epochs, values - (values[0] if key == "nll" else 0.0), "o-")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"nll": "NLL - NLL(epoch 1)", "kl": "KL(corrected || physics)", "prior": "-log prior"}[key])
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_correction(correction, path: str | Path) -> Path:
    """The learned redistribution stencil (fraction of a pixel's photons moved to each
    neighbour), the log-gain nodes of every panel (centred) and the head's coefficients."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    r = correction.settings.stencil_radius
    stencil = np.zeros((2 * r + 1, 2 * r + 1))
    coefficients = correction.coefficients().detach().cpu().numpy()
    for c, (dx, dy) in zip(coefficients, correction.offsets):
        stencil[r + dy, r + dx] = c
    stencil[r, r] = -coefficients.sum()
    image = axes[0].imshow(stencil, cmap="RdBu_r", vmin=-abs(stencil).max() or -1, vmax=abs(stencil).max() or 1)
    fig.colorbar(image, ax=axes[0])
    axes[0].set_title("redistribution (centre: fraction that leaves)")
    nodes = correction.node_log_gains().detach().cpu().numpy()
    image = axes[1].imshow(nodes.T, aspect="auto", cmap="RdBu_r")
    fig.colorbar(image, ax=axes[1])
    axes[1].set_xlabel("panel")
    axes[1].set_ylabel("node")
    axes[1].set_title("log gain nodes")
    axes[2].bar(range(correction.head_weights.numel()), correction.head_weights.detach().cpu().numpy())
    axes[2].set_title("intensity head coefficients")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_noise_flow(flow, path: str | Path) -> Path:
    """The learned pixel noise (:class:`~spread_dials.correct.noise_flow.ResidualFlow`): its
    precision factor 1 / Var(z) over the tabulated rates (1: the Gaussian readout's), and its
    density of z at three rates beside N(0, 1)."""
    import torch

    from spread_dials.correct.noise_flow import CONTEXT_SCALE

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    low, high = flow.context_range.tolist()
    rates = np.expm1(np.linspace(low, high, len(flow.precision_table)) * CONTEXT_SCALE)
    axes[0].semilogx(np.maximum(rates, 1e-3), flow.precision_table.cpu().numpy(), "o-")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xlabel("pixel rate (photons)")
    axes[0].set_ylabel("precision factor 1 / Var(z)")
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    with torch.no_grad():
        for rate in (rates[0], rates[len(rates) // 2], rates[-1]):
            density = flow.log_density(z, torch.full_like(z, float(rate))).exp()
            axes[1].plot(z.numpy(), density.numpy(), label=f"rate {rate:.3g}")
    axes[1].plot(z.numpy(), np.exp(-0.5 * z.numpy() ** 2) / np.sqrt(2 * np.pi), "k--", lw=0.8, label="N(0, 1)")
    axes[1].set_xlabel("standardized residual z")
    axes[1].set_ylabel("q(z | rate)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_predictive(check: dict, path: str | Path) -> Path:
    """Held-out stills' standardized residuals (mean and sd of z) per panel group and resolution
    shell, before (physics) and after the correction, with the ideal mean 0 and sd 1 marked and
    each bar's value written on it; an axis goes logarithmic (symlog for the mean) when a bar is
    more than 10 from its ideal."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex="col")
    for col, (key, name) in enumerate((("panel_groups", "panels"), ("resolution_shells", "resolution shell (d, A)"))):
        for row, (stat, ideal) in enumerate((("mean", 0.0), ("sd", 1.0))):
            ax = axes[row, col]
            spread = []
            for offset, when, colour in ((-0.15, "before", "C7"), (0.15, "after", "C0")):
                values = np.array([np.nan if g[stat] is None else g[stat] for g in check.get(when, {}).get(key, [])])
                bars = ax.bar(np.arange(len(values)) + offset, values - ideal, width=0.3, bottom=ideal, color=colour,
                              label={"before": "physics", "after": "corrected"}[when])  # fmt: skip
                ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.3g}" for v in values], fontsize=6)
                spread += [abs(v - ideal) for v in values if np.isfinite(v)]
            if spread and max(spread) > 10:  # a missing PSF gives sd ~1e3 against the corrected 1.0: keep both readable
                ax.set_yscale("symlog", linthresh=1.0) if stat == "mean" else ax.set_yscale("log")
            ax.axhline(ideal, color="k", lw=0.8)
            ax.set_ylabel(f"{stat} of z")
            groups = check.get("after", check.get("before", {})).get(key, [])
            ax.set_xticks(range(len(groups)), [_group_label(g) for g in groups], fontsize=8)
            if row == 1:
                ax.set_xlabel(name)
    # the legend above the axes: inside, it covered a bar's label
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=8)
    fig.suptitle(f"held-out stills ({len(check['held_out_stills'])}): z = (k - lambda) / sqrt(var)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, path, dpi=110)


def _group_label(group: dict) -> str:
    """'first-last' panels, or the shell's 'd_max-d_min' (A; open ends as '>' / '<'; 'all' for
    the one shell of correct.predictive.resolution_shells = 1)."""
    if "panels" in group:
        return "{}-{}".format(*group["panels"])
    high, low = group["d_max_A"], group["d_min_A"]
    if high is None and low is None:
        return "all"
    if high is None:
        return f"> {low:.2f}"
    return f"< {high:.2f}" if low is None else f"{high:.2f}-{low:.2f}"


def plot_residual_maps(maps: dict, path: str | Path) -> Path:
    """The fitted stills' standardized residuals before (physics at the warm start, per-shot
    parameters fitted) and after the correction: mean and sd of z per offset from the shoebox's
    centre (diverging about 0 and 1, one colour scale per column; the sd's from 0 at most) and
    per panel (:mod:`spread_dials.correct.residual_maps`)."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    whens = [w for w in ("before", "after") if w in maps]
    frames = {w: {k: np.array([[np.nan if x is None else x for x in row] for row in maps[w]["frame"][k]], dtype=float)
                  for k in ("mean", "sd")} for w in whens}  # fmt: skip
    radius = maps[whens[0]]["frame"]["radius"]
    extent = (-radius - 0.5, radius + 0.5, radius + 0.5, -radius - 0.5)
    fig, axes = plt.subplots(len(whens), 3, figsize=(13, 3.8 * len(whens)), squeeze=False)
    for col, (stat, centre) in enumerate((("mean", 0.0), ("sd", 1.0))):
        reach = max(float(np.nanmax(np.abs(frames[w][stat] - centre), initial=0.0)) for w in whens) or 1.0
        for row, when in enumerate(whens):
            ax = axes[row, col]
            low = centre - reach if stat == "mean" else max(centre - reach, 0.0)  # an sd is >= 0
            norm = TwoSlopeNorm(vmin=low, vcenter=centre, vmax=centre + reach)
            image = ax.imshow(frames[when][stat], cmap="RdBu_r", norm=norm, extent=extent)
            fig.colorbar(image, ax=ax, shrink=0.8)
            ax.set_title(f"{'physics' if when == 'before' else 'corrected'}: {stat} of z in the shoebox frame", fontsize=9)
            ax.set_xlabel("fast offset (px)")
            ax.set_ylabel("slow offset (px)")
    for row, when in enumerate(whens):
        ax = axes[row, 2]
        panels = maps[when]["panels"]
        index = [p["panel"] for p in panels]
        for stat, marker in (("mean", "o"), ("sd", "s")):
            ax.plot(index, [np.nan if p[stat] is None else p[stat] for p in panels], marker, ms=3, label=f"{stat} of z")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("panel")
        ax.set_title(f"{'physics' if when == 'before' else 'corrected'}: per panel", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
