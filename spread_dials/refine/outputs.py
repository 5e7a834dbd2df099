"""dials.spread_refine's files (rank 0): sites .json/.csv, .h5 with curves, covariance and
bootstrap draws, the refined stills (.expt/.refl), PNGs.  Every file is written under a
temporary name and renamed.

The sites .csv holds one row per site group (edge_shift and spline_kk: edge shift, sigmas,
intervals, oxidation state, truth), one per pair of groups (site, site_b, difference_eV,
sigma_eV) and, with truth=, one per site with the Figure 9 columns (window, points, CC and
RMSD of f' and f'' against the truth; the .json's "figure9").

The refined stills: ``<prefix>.expt`` holds every refined experiment (input file order, then
experiment order) with its crystal turned by the still's refined rotation r (rad, lab frame)
and its cell lengths scaled by s (3,) (1 when the cell is not refined): U' = R(r) U and
B' = B diag(1 / s), so the real-space rows become diag(s) A R(r)^T as in
:func:`~spread_dials.refine.profiles.crystal_real_space`.  ``<prefix>.refl``
holds one row per refined shoebox (all the input columns of its row, ``id`` renumbered to the
new list) and the columns

- ``spread.bragg_photons`` (double): the model's Bragg photons in the shoebox, sum over its
  pixels of G * bragg (:mod:`spread_dials.refine.residuals`);
- ``spread.sigma_z`` (double): rms of the standardized residuals over its valid pixels;
- ``spread.mean_z`` (double), ``spread.n_valid`` (int): their mean and number;
- ``spread.scale`` (double): the still's refined scale G;
- ``spread.energy_jitter_eV`` (double, with refinement.energy_jitter_sigma_eV): the still's
  refined energy jitter (its recorded spectrum's offset from the true energies);
- ``spread.rejected`` (bool): left out of the fit (sigma_z > refinement.reject_sigma_z after a
  stage 1);
- ``spread.bragg_photons_physics`` (double, dials.spread_correct only): the same photons under
  the physics model alone (``spread.bragg_photons`` is then the corrected model's);
- ``spread.flagged`` (bool): sigma_z > refinement.flag_sigma_z.  A column rather than a DIALS
  flag: no reflection_table flag means "misfit by a pixel model" (``bad_shoebox``,
  ``outlier_in_scaling`` and ``centroid_outlier`` mean other things, and downstream DIALS
  programs act on them); flagged rows stay in the fit unless also rejected.
"""

from __future__ import annotations

import csv
import io
import json
import logging

import h5py
import numpy as np
import torch

from spread_dials.util.atomic import atomic_path, write_text_atomic

__all__ = ["write_outputs", "write_refined_stills", "refined_stills", "gaussian_draws", "curve_draws", "site_curve_rows"]

logger = logging.getLogger("dials.spread.refine")

#: the sites .csv's columns of the Figure 9 rows (one row per site, with truth=)
FIGURE9_COLUMNS = ["figure9_window_eV", "figure9_points", "cc_f_prime", "rmsd_f_prime_e", "cc_f_double_prime",
                   "rmsd_f_double_prime_e"]  # fmt: skip


def gaussian_draws(theta: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """(n, P) draws of N(theta (P,), cov (P, P)) from ``seed`` (a positive semi-definite
    square root of the symmetrised ``cov``: negative eigenvalues count as 0)."""
    gen = torch.Generator().manual_seed(int(seed))
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    root = evecs * evals.clamp(min=0).sqrt()
    return theta + torch.randn((n, theta.numel()), generator=gen, dtype=theta.dtype) @ root.T


def curve_draws(sites, draws: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """(n, 2, S, E) f'/f'' of the site model ``sites`` on ``energy`` (E,) eV for each row of
    ``draws`` (n, P)."""
    return torch.stack([torch.stack(sites.curves(t, energy)) for t in draws])


def site_curve_rows(sites, fp: torch.Tensor, fdp: torch.Tensor, band68: torch.Tensor, band95: torch.Tensor, refs,
                    energy: torch.Tensor, truth_curves=None) -> list[dict]:  # fmt: skip
    """Per site the rows of :func:`~spread_dials.plots.refine.plot_site_curves`: f', f'' (S, E)
    on ``energy`` (E,) eV, the 68 and 95 % bands (2 low/high, 2 f'/f'', S, E), the site's
    oxidation-state references and, given ``truth_curves`` (one per site), the truth."""
    rows = []
    for s in range(sites.n_sites):
        rows.append({
            "label": sites.group_labels[int(sites.group[s])], "f_prime": fp[s].numpy(), "f_double_prime": fdp[s].numpy(),
            "band68": band68[:, :, s].permute(1, 0, 2).numpy(), "band95": band95[:, :, s].permute(1, 0, 2).numpy(),
            "states": {c.label: tuple(x.numpy() for x in c.to(dtype=torch.float64).at(energy)) for c in refs.state_curves[s].values()},
            "truth": None if truth_curves is None else tuple(x.numpy() for x in (
                truth_curves[s].energy_eV, truth_curves[s].f_prime, truth_curves[s].f_double_prime)),
        })  # fmt: skip
    return rows


def write_outputs(ctx, results: dict, refinement, refs, draws: torch.Tensor, band, truth_curves=None, pairs=None,
                  stills=None, panels=None) -> None:  # fmt: skip
    """Every file of the run (module docstring); ``truth_curves``: the simulated curve per site, or None;
    ``pairs``: the input (.expt, .refl) paths, ``stills`` and ``panels`` the gathered residuals
    (:func:`~spread_dials.refine.residuals.gather_residuals`): with them the refined stills and
    the residual plot are written."""
    params = ctx.params
    prefix = params.output.prefix
    sites = refinement.sites
    theta = refinement.theta
    cov = torch.tensor(results["covariance"], dtype=torch.float64)
    energy = torch.arange(np.floor(band[0]), np.ceil(band[1]) + 0.5, 1.0, dtype=torch.float64)
    fp, fdp = sites.curves(theta, energy)
    samples = curve_draws(sites, gaussian_draws(theta, cov, 400, params.random.seed), energy)
    written = []

    path = ctx.output_path(f"{prefix}_sites.json")
    written.append(write_text_atomic(path, json.dumps(results, indent=1)))
    figure9 = results.get("figure9") or {}
    if results["sites"] or figure9:
        buffer = io.StringIO()
        keys = ["site", "reference", "edge_shift_eV", "sigma_eV", "sigma_fisher_eV", "sigma_sandwich_eV", "sigma_bootstrap_eV",
                "interval68_eV", "interval95_eV", "oxidation_state", "state_probability", "truth_edge_shift_eV", "error_in_sigma"]  # fmt: skip
        writer = csv.DictWriter(buffer, fieldnames=keys + ["site_b", "difference_eV"] + FIGURE9_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results["sites"]:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v) for k, v in row.items()})
        for pair in results["pairs"]:
            writer.writerow({"site": pair["site_a"], "site_b": pair["site_b"], "difference_eV": pair["difference_eV"],
                             "sigma_eV": pair["sigma_eV"]})  # fmt: skip
        for site, f9 in figure9.items():
            writer.writerow({"site": site, "figure9_window_eV": json.dumps(f9["window_eV"]), "figure9_points": f9["points"],
                             **{k: f9[k] for k in FIGURE9_COLUMNS[2:]}})  # fmt: skip
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
    if pairs is not None and stills is not None:
        written.extend(write_refined_stills(ctx.output_path(f"{prefix}.expt"), ctx.output_path(f"{prefix}.refl"),
                                            pairs, stills))  # fmt: skip

    if params.plots:
        from spread_dials.plots.refine import plot_edge_shifts, plot_nll, plot_panel_residuals, plot_site_curves

        bands = torch.quantile(samples, torch.tensor([0.16, 0.84, 0.025, 0.975], dtype=samples.dtype), dim=0)
        curves = site_curve_rows(sites, fp, fdp, bands[:2], bands[2:], refs, energy, truth_curves)
        written.append(plot_site_curves(energy.numpy(), curves, ctx.output_path(f"{prefix}_fp_fdp.png")))
        if results["sites"]:
            written.append(plot_edge_shifts(results["sites"], ctx.output_path(f"{prefix}_edge_shifts.png")))
        written.append(plot_nll(results["history"], ctx.output_path(f"{prefix}_nll.png")))
        if panels is not None:
            written.append(plot_panel_residuals(panels, ctx.output_path(f"{prefix}_residuals.png"),
                                                results.get("residuals", {}).get("flag_sigma_z")))  # fmt: skip
    logger.info("Wrote %s", ", ".join(str(p) for p in written))


def _rotation_matrix(rotation_rad) -> tuple[float, ...]:
    from spread_dials.physics.crystal import rotation_from_vector

    r = torch.as_tensor(np.asarray(rotation_rad, dtype=np.float64))
    return tuple(float(x) for x in rotation_from_vector(r).reshape(-1))


def refined_stills(pairs, stills: list[dict]):
    """(ExperimentList, reflection_table) of the refined stills (module docstring).

    Args:
        pairs: the input (.expt, .refl) paths, in the order the loader read them.
        stills: per refined still (:func:`~spread_dials.refine.residuals.gather_residuals`):
            "identifier", "rotation_rad", "cell_scale" (optional), "scale", "reflection" (its shoeboxes' rows among the
            experiment's rows of its .refl), and the per-shoebox arrays.
    """
    import copy

    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
    from scitbx import matrix

    from spread_dials.refine.loader import _experiment_ids

    by_identifier = {s["identifier"]: s for s in stills}
    experiments_out = ExperimentList()
    table_out = flex.reflection_table()
    for expt_path, refl_path in pairs:
        experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
        table = flex.reflection_table.from_file(str(refl_path))
        ids = table["id"].as_numpy_array()
        for experiment, table_id in zip(experiments, _experiment_ids(table, experiments, expt_path, refl_path)):
            still = by_identifier.get(experiment.identifier)
            if still is None:
                continue
            crystal = copy.deepcopy(experiment.crystal)
            crystal.set_U(matrix.sqr(_rotation_matrix(still["rotation_rad"])) * matrix.sqr(crystal.get_U()))
            scale = np.asarray(still.get("cell_scale", np.ones(3)), dtype=np.float64)
            if (scale != 1).any():
                crystal.set_B(matrix.sqr(crystal.get_B()) * matrix.diag(tuple(float(x) for x in 1.0 / scale)))
            experiment.crystal = crystal
            new_id = len(experiments_out)
            experiments_out.append(experiment)
            rows = np.flatnonzero(ids == table_id)[still["reflection"]]
            piece = table.select(flex.size_t(rows.astype(np.uint64)))
            known = piece.experiment_identifiers()
            for key in list(known.keys()):
                del known[key]
            piece["id"] = flex.int(len(piece), new_id)
            known[new_id] = experiment.identifier
            n = len(piece)
            piece["spread.bragg_photons"] = flex.double(still["bragg_photons"].astype(np.float64))
            piece["spread.sigma_z"] = flex.double(still["sigma_z"].astype(np.float64))
            piece["spread.mean_z"] = flex.double(still["mean_z"].astype(np.float64))
            piece["spread.n_valid"] = flex.int(still["n_valid"].astype(np.int32))
            piece["spread.scale"] = flex.double(n, float(still["scale"]))
            if still.get("energy_jitter_eV") is not None:
                piece["spread.energy_jitter_eV"] = flex.double(n, float(still["energy_jitter_eV"]))
            if still.get("mosaic_spread_abc_deg") is not None:
                piece["spread.mosaic_spread_abc_deg"] = flex.vec3_double(n, tuple(float(x) for x in still["mosaic_spread_abc_deg"]))
            piece["spread.flagged"] = flex.bool(still["flagged"].astype(bool))
            piece["spread.rejected"] = flex.bool(still["rejected"])
            if "bragg_photons_physics" in still:  # dials.spread_correct: the physics model's photons beside the corrected
                piece["spread.bragg_photons_physics"] = flex.double(still["bragg_photons_physics"].astype(np.float64))
            table_out.extend(piece)
    return experiments_out, table_out


def write_refined_stills(expt_path, refl_path, pairs, stills: list[dict]) -> list:
    """Write :func:`refined_stills` to ``expt_path`` and ``refl_path`` (each atomically)."""
    experiments, table = refined_stills(pairs, stills)
    with atomic_path(expt_path) as tmp:
        experiments.as_file(str(tmp))
    with atomic_path(refl_path) as tmp:
        table.as_file(str(tmp))
    return [expt_path, refl_path]
