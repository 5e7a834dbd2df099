"""The spectrometer's calibration as physics latents of dials.spread_correct (pure torch).

A still's recorded channel energies E_rec (eV) map to the true ones by

    E_true = E_nom + kappa (E_rec - E_nom) - offset,    kappa = 1 + dispersion,

with a global ``offset`` (eV) and a global ``dispersion`` error (dimensionless: the relative error
of the spectrometer's eV per channel), each with a zero-mean Gaussian calibration prior
(CORRECT_DESIGN.md: offset ~ N(0, sigma_cal^2), kappa ~ N(1, 0.5 %^2)).
:class:`SpectrometerSites` wraps any :class:`~spread_dials.refine.sites.SiteModel`: its
parameters are the site model's followed by the latents switched on, and f', f'' of every site are
the site model's at E_true, so the refine engine's stage 1, Fisher information and scoring step
treat the latents as further global parameters.

The offset moves every site's curve alike, exactly as a common edge shift does: the data cannot
tell them apart and only the prior separates them.  The latent is there so that the absolute
edge shifts carry the calibration's uncertainty (sigma_abs^2 ~ sigma_data^2 + sigma_cal^2 under a
broad edge-shift prior) while the inter-site differences, which the offset cannot move, keep the
data's; the positions of spots do not enter (a common relative energy error is a cell scale,
which each still's cell refinement absorbs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spread_dials.refine.sites import SiteModel

__all__ = ["SpectrometerSites"]


class SpectrometerSites(SiteModel):
    """``sites`` with the spectrometer's offset and dispersion error as further parameters.

    Args:
        sites: the site model (edge shifts, free or spline_kk).
        nominal_eV: E_nom, the energy the dispersion error pivots about (eV).
        offset_sigma_eV: calibration prior sd of the offset (eV), or None: no offset latent.
        dispersion_sigma: calibration prior sd of the dispersion error, or None: none.

    Raises:
        ValueError: a prior sd that is not positive.
    """

    def __init__(self, sites: SiteModel, nominal_eV: float, offset_sigma_eV: float | None, dispersion_sigma: float | None):
        super().__init__(sites.references, sites.group.tolist(), sites.group_labels)
        for name, sigma in (("offset_sigma_eV", offset_sigma_eV), ("dispersion_sigma", dispersion_sigma)):
            if sigma is not None and not sigma > 0:
                raise ValueError(f"spectrometer.{name} must be > 0 (or None: no latent), not {sigma}")
        self.sites = sites
        self.kind = sites.kind
        self.nominal_eV = float(nominal_eV)
        self.latents = [(n, float(s)) for n, s in (("offset", offset_sigma_eV), ("dispersion", dispersion_sigma)) if s is not None]
        self.n_site_parameters = int(sites.initial().numel())

    @property
    def latent_indices(self) -> tuple[int, ...]:
        """Positions of the latents switched on in ``theta`` (after the site model's)."""
        return tuple(range(self.n_site_parameters, self.n_site_parameters + len(self.latents)))

    def extend(self, site_theta: Tensor) -> Tensor:
        """(P + L,) the site model's parameters ``site_theta`` (P,) with every latent at 0 (its
        prior mean)."""
        return torch.cat([site_theta.to(torch.float64), torch.zeros(len(self.latents), dtype=torch.float64)])

    def split(self, theta: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(the site model's parameters, {latent name: 0-d value}) of ``theta``."""
        p = self.n_site_parameters
        return theta[:p], {name: theta[p + k] for k, (name, _) in enumerate(self.latents)}

    def true_energy(self, theta: Tensor, energy_eV: Tensor) -> Tensor:
        """(C,) E_true (eV) of recorded channel energies ``energy_eV`` (C,) under ``theta``."""
        _, latent = self.split(theta)
        e = energy_eV.to(theta.dtype)
        if "dispersion" in latent:
            e = self.nominal_eV + (1 + latent["dispersion"]) * (e - self.nominal_eV)
        if "offset" in latent:
            e = e - latent["offset"]
        return e

    def initial(self) -> Tensor:
        return self.extend(self.sites.initial())

    def curves(self, theta: Tensor, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        site_theta, _ = self.split(theta)
        return self.sites.curves(site_theta, self.true_energy(theta, energy_eV))

    def negative_log_prior(self, theta: Tensor) -> Tensor:
        site_theta, latent = self.split(theta)
        total = self.sites.negative_log_prior(site_theta)
        for name, sigma in self.latents:
            total = total + 0.5 * (latent[name] / sigma) ** 2
        return total

    def parameter_names(self) -> list[str]:
        units = {"offset": "spectrometer_offset_eV", "dispersion": "spectrometer_dispersion"}
        return [*self.sites.parameter_names(), *(units[name] for name, _ in self.latents)]
