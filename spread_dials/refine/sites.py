"""The global parameters of SPREAD refinement: f'(E), f''(E) of every anomalous site (pure torch).

A :class:`SiteModel` maps a flat parameter vector ``theta`` (the refined values, with sites
tied into groups) to f', f'' (S, C) of every site at any channel energies (C,) (eV), and gives
the negative log prior of ``theta``.  Models:

- ``edge_shift``: one edge shift Delta_E (eV) per group against that group's reference curve,
  f_s(E) = f_ref(E - Delta_E) for f' and f'' together (Kramers-Kronig consistent to
  O(Delta_E / E); physics.anomalous.EdgeShiftModel), with a broad Gaussian prior.
- ``free``: f' and f'' per group on a fixed energy grid (eV), linearly interpolated to each
  shot's channels, with the smoothness and Kramers-Kronig priors of Sauter et al. 2020
  (physics.anomalous.FreeChannelModel's penalties).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spread_dials.physics.anomalous import (
    TabulatedCurve,
    band_kramers_kronig_matrix,
    interpolate_linear,
    second_difference_penalty,
)

__all__ = ["SiteModel", "EdgeShiftSites", "FreeSites"]


class SiteModel:
    """f', f'' of S sites from a flat parameter vector.

    Attributes:
        references: one reference curve per site.
        group: (S,) long, the parameter group of each site (tied sites share one).
        group_labels: a label per group.
    """

    kind = ""

    def __init__(self, references: Sequence[TabulatedCurve], group: Sequence[int], group_labels: Sequence[str]):
        if len(references) != len(group):
            raise ValueError("one reference curve per site is needed")
        self.references = list(references)
        self.group = torch.as_tensor(list(group), dtype=torch.long)
        self.group_labels = list(group_labels)
        if sorted(set(self.group.tolist())) != list(range(len(self.group_labels))):
            raise ValueError("site groups must be numbered 0 .. n_groups - 1")

    @property
    def n_sites(self) -> int:
        return int(self.group.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.group_labels)

    def initial(self) -> Tensor:
        """(P,) float64 starting parameters."""
        raise NotImplementedError

    def curves(self, theta: Tensor, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        """(f', f'') each (S, C) (electrons) at ``energy_eV`` (C,) for parameters ``theta`` (P,)."""
        raise NotImplementedError

    def negative_log_prior(self, theta: Tensor) -> Tensor:
        """Scalar -log prior (up to a constant)."""
        raise NotImplementedError

    def parameter_names(self) -> list[str]:
        raise NotImplementedError


class EdgeShiftSites(SiteModel):
    """One edge shift (eV) per group; f_s(E) = f_ref,s(E - Delta_E_group(s)).

    Arguments:
        references, group, group_labels: see :class:`SiteModel`.
        start_eV: (n_groups,) starting shifts (eV).
        prior_sigma_eV: width of the zero-mean Gaussian prior on each shift (eV; weak).
    """

    kind = "edge_shift"

    def __init__(self, references, group, group_labels, start_eV: Sequence[float] | None = None, prior_sigma_eV: float = 10.0):
        super().__init__(references, group, group_labels)
        self.start = torch.zeros(self.n_groups, dtype=torch.float64) if start_eV is None else torch.as_tensor(start_eV, dtype=torch.float64)
        self.prior_sigma_eV = float(prior_sigma_eV)

    def initial(self) -> Tensor:
        return self.start.clone()

    def curves(self, theta: Tensor, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        shift = theta[self.group.to(theta.device)]  # (S,)
        fp, fdp = [], []
        for s, ref in enumerate(self.references):
            a, b = ref.to(device=theta.device, dtype=theta.dtype).at(energy_eV.to(theta.dtype), shift[s])
            fp.append(a)
            fdp.append(b)
        return torch.stack(fp), torch.stack(fdp)

    def negative_log_prior(self, theta: Tensor) -> Tensor:
        return 0.5 * (theta / self.prior_sigma_eV).pow(2).sum()

    def parameter_names(self) -> list[str]:
        return [f"edge_shift_eV[{label}]" for label in self.group_labels]


class FreeSites(SiteModel):
    """f' and f'' per group on an energy grid (eV), started from the references.

    theta = [f' (G, K) flattened, f'' (G, K) flattened].  Prior: Gaussian on squared second
    differences (width ``smoothness_sigma_e``) and on the Kramers-Kronig residual of the change
    from the reference (width ``kramers_kronig_sigma_e``), as physics.anomalous.FreeChannelModel.
    """

    kind = "free"

    def __init__(self, references, group, group_labels, grid_eV: Tensor, smoothness_sigma_e: float = 0.1,
                 kramers_kronig_sigma_e: float = 0.1):  # fmt: skip
        super().__init__(references, group, group_labels)
        self.grid_eV = grid_eV.to(torch.float64)
        if self.grid_eV.numel() < 3:
            raise ValueError("the free model needs at least three grid energies")
        first_site = [int((self.group == g).nonzero()[0]) for g in range(self.n_groups)]
        ref = [self.references[s].at(self.grid_eV) for s in first_site]
        self.reference_f_prime = torch.stack([r[0] for r in ref]).double()
        self.reference_f_double_prime = torch.stack([r[1] for r in ref]).double()
        self.kk_matrix = band_kramers_kronig_matrix(self.grid_eV)
        self.smoothness_sigma_e = float(smoothness_sigma_e)
        self.kramers_kronig_sigma_e = float(kramers_kronig_sigma_e)

    def _split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        k = self.grid_eV.numel()
        return theta[: self.n_groups * k].view(self.n_groups, k), theta[self.n_groups * k :].view(self.n_groups, k)

    def initial(self) -> Tensor:
        return torch.cat([self.reference_f_prime.reshape(-1), self.reference_f_double_prime.reshape(-1)])

    def curves(self, theta: Tensor, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        fp, fdp = self._split(theta)
        grid = self.grid_eV.to(device=theta.device, dtype=theta.dtype)
        g = self.group.to(theta.device)
        e = energy_eV.to(theta.dtype).expand(self.n_sites, -1)
        return interpolate_linear(e, grid, fp[g]), interpolate_linear(e, grid, fdp[g])

    def negative_log_prior(self, theta: Tensor) -> Tensor:
        fp, fdp = self._split(theta)
        grid = self.grid_eV.to(theta)
        smooth = second_difference_penalty(fp, grid) + second_difference_penalty(fdp, grid)
        kk = (fp - self.reference_f_prime.to(theta)) - (fdp - self.reference_f_double_prime.to(theta)) @ self.kk_matrix.to(theta).T
        return 0.5 * (smooth / self.smoothness_sigma_e**2 + kk.pow(2).sum() / self.kramers_kronig_sigma_e**2)

    def parameter_names(self) -> list[str]:
        names = []
        for what in ("f_prime", "f_double_prime"):
            for label in self.group_labels:
                names += [f"{what}[{label}]@{float(e):.1f}eV" for e in self.grid_eV]
        return names
