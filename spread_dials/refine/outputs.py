"""dials.spread_refine's files (rank 0): sites .json/.csv, .h5 with curves, covariance and
bootstrap draws, PNGs.  Every file is written under a temporary name and renamed."""

from __future__ import annotations

import csv
import io
import json
import logging

import h5py
import numpy as np
import torch

from spread_dials.util.atomic import atomic_path, write_text_atomic

__all__ = ["write_outputs"]

logger = logging.getLogger("dials.spread.refine")


def _curve_draws(sites, theta: torch.Tensor, cov: torch.Tensor, energy: torch.Tensor, n: int = 400, seed: int = 0):
    """(n, 2, S, E) f'/f'' for Gaussian draws of theta ~ N(theta, cov)."""
    gen = torch.Generator().manual_seed(seed)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp(min=0).sqrt()
    draws = theta + torch.randn((n, theta.numel()), generator=gen, dtype=theta.dtype) @ root.T
    return torch.stack([torch.stack(sites.curves(t, energy)) for t in draws])


def write_outputs(ctx, results: dict, refinement, refs, draws: torch.Tensor, band, truth_curves=None) -> None:
    """Every file of the run (module docstring); ``truth_curves``: the simulated curve per site, or None."""
    params = ctx.params
    prefix = params.output.prefix
    sites = refinement.sites
    theta = refinement.theta
    cov = torch.tensor(results["covariance"], dtype=torch.float64)
    energy = torch.arange(np.floor(band[0]), np.ceil(band[1]) + 0.5, 1.0, dtype=torch.float64)
    fp, fdp = sites.curves(theta, energy)
    samples = _curve_draws(sites, theta, cov, energy, seed=params.random.seed)
    written = []

    path = ctx.output_path(f"{prefix}_sites.json")
    written.append(write_text_atomic(path, json.dumps(results, indent=1)))
    if results["sites"]:
        buffer = io.StringIO()
        keys = ["site", "reference", "edge_shift_eV", "sigma_eV", "sigma_fisher_eV", "sigma_sandwich_eV", "sigma_bootstrap_eV",
                "interval68_eV", "interval95_eV", "oxidation_state", "state_probability", "truth_edge_shift_eV", "error_in_sigma"]  # fmt: skip
        writer = csv.DictWriter(buffer, fieldnames=keys + ["site_b", "difference_eV"], extrasaction="ignore")
        writer.writeheader()
        for row in results["sites"]:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v) for k, v in row.items()})
        for pair in results["pairs"]:
            writer.writerow({"site": pair["site_a"], "site_b": pair["site_b"], "difference_eV": pair["difference_eV"],
                             "sigma_eV": pair["sigma_eV"]})  # fmt: skip
        written.append(write_text_atomic(ctx.output_path(f"{prefix}_sites.csv"), buffer.getvalue()))

    with atomic_path(ctx.output_path(f"{prefix}.h5")) as tmp:
        with h5py.File(tmp, "w") as h:
            h.attrs["program"] = "dials.spread_refine"
            h.attrs["model"] = sites.kind
            h["energy_eV"] = energy.numpy()
            h["f_prime"] = fp.detach().numpy()
            h["f_double_prime"] = fdp.detach().numpy()
            h["f_prime_sigma"] = samples[:, 0].std(0).numpy()
            h["f_double_prime_sigma"] = samples[:, 1].std(0).numpy()
            h["theta"] = theta.numpy()
            h["parameter_names"] = np.array(sites.parameter_names(), dtype="S")
            h["covariance"] = cov.numpy()
            h["covariance_conditional"] = np.array(results["covariance_conditional"])
            h["bootstrap_theta"] = draws.numpy()
            h["site_labels"] = np.array([s.encode() for s in sites.group_labels])
            h["nll_per_macrocycle"] = np.array([r["nll"] for r in results["history"]])
    written.append(ctx.output_path(f"{prefix}.h5"))

    if params.plots:
        from spread_dials.plots.refine import plot_edge_shifts, plot_nll, plot_site_curves

        curves = []
        for s in range(sites.n_sites):
            states = {c.label: tuple(x.numpy() for x in c.to(dtype=torch.float64).at(energy)) for c in refs.state_curves[s].values()}
            curves.append({
                "label": sites.group_labels[int(sites.group[s])], "f_prime": fp[s].numpy(), "f_double_prime": fdp[s].numpy(),
                "band68": np.quantile(samples[:, :, s].numpy(), [0.16, 0.84], axis=0).transpose(1, 0, 2),
                "band95": np.quantile(samples[:, :, s].numpy(), [0.025, 0.975], axis=0).transpose(1, 0, 2),
                "states": states,
                "truth": None if truth_curves is None else tuple(x.numpy() for x in (
                    truth_curves[s].energy_eV, truth_curves[s].f_prime, truth_curves[s].f_double_prime)),
            })  # fmt: skip
        written.append(plot_site_curves(energy.numpy(), curves, ctx.output_path(f"{prefix}_fp_fdp.png")))
        if results["sites"]:
            written.append(plot_edge_shifts(results["sites"], ctx.output_path(f"{prefix}_edge_shifts.png")))
        written.append(plot_nll(results["history"], ctx.output_path(f"{prefix}_nll.png")))
    logger.info("Wrote %s", ", ".join(str(p) for p in written))
