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
- ``spline_kk``: a change of f'' per group given at nodes over the band, smooth between them,
  on top of each site's reference; the change of f' is the exact Kramers-Kronig transform of
  the change of f'' (physics.kramers_kronig), so the pair stays consistent by construction;
  Gaussian prior on the change's second differences and on the change itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from spread_dials.physics.anomalous import (
    TabulatedCurve,
    band_kramers_kronig_matrix,
    interpolate_cubic,
    interpolate_linear,
    second_difference_penalty,
)
from spread_dials.physics.kramers_kronig import kramers_kronig_matrix

__all__ = ["SiteModel", "EdgeShiftSites", "FreeSites", "SplineKKSites"]


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


def _plain(t: Tensor) -> bool:
    """False for a tensor made inside a torch.func transform (jacfwd in the curvature): such a
    tensor belongs to that transform and must not be kept (its data cannot be read there)."""
    try:
        t.numpy()
    except RuntimeError:
        return False
    return True


class SplineKKSites(SiteModel):
    """f'' = reference + a smooth change given at nodes; f' = reference + the exact
    Kramers-Kronig transform of that change.

    Per group g the change of f'' is Delta_g(E) = sum_k theta[g, k] b_k(E): the cubic Hermite
    (Catmull-Rom, :func:`~spread_dials.physics.anomalous.interpolate_cubic`) interpolant
    through the values theta[g, :] at the K nodes ``nodes_eV`` and through zeros at two extra
    nodes one node step beyond each end.  So Delta is continuous with a continuous first
    derivative everywhere and exactly zero outside [nodes[0] - 2 h, nodes[-1] + 2 h] (h the end
    steps): beyond the nodes the change vanishes, it is not held (a change held constant out to
    infinity has no finite transform).  Site s of group g has

        f''_s(E) = f''_ref,s(E) + Delta_g(E),
        f'_s(E)  = f'_ref,s(E) + KK[Delta_g](E),

    where KK is :func:`~spread_dials.physics.kramers_kronig.kramers_kronig_matrix` applied to
    Delta_g sampled on a fine grid (the node steps split into pieces of at most
    ``fine_step_eV``): the exact transform of the piecewise-linear function through those
    samples, which differs from the transform of the cubic itself by O(fine step^2 Delta'')
    (about 2e-4 e per electron of node change at 0.05 eV, tests/refine/test_spline_kk.py).
    Because Delta vanishes outside the fine grid the transform needs no tail correction.  Each
    site keeps its own reference; the change is shared by the group (as the refined values of
    the other models are).

    Both curves are linear in theta.  KK[b_k] is computed once on a query grid (the fine grid
    and ``margin_eV`` beyond it, same step) and interpolated (cubic Hermite) to any channel
    energy inside it (exactly transformed outside it); per set of channel energies the (C, K)
    matrices b_k(E_c), KK[b_k](E_c) and the references at E_c are kept (the last
    ``cache_size`` sets), so a still's curves cost two small matrix products.

    Prior (Gaussian): the second differences of neighbouring node values of each group,
    theta[g, k-1] - 2 theta[g, k] + theta[g, k+1] (electrons), of width ``smoothness_sigma_e``,
    and every node value of width ``change_sigma_e`` (weak; it makes the prior proper).

    Arguments:
        references, group, group_labels: see :class:`SiteModel`.
        nodes_eV: (K,) strictly increasing node energies (eV), K >= 3; usually a uniform grid
            over the spectra's band.
        smoothness_sigma_e: width (e) of the prior on second differences.
        change_sigma_e: width (e) of the prior on each node value.
        fine_step_eV: the largest step (eV) of the grid the change is transformed on.
        margin_eV: how far (eV) beyond the fine grid the query grid reaches.
        cache_size: energy sets whose matrices are kept.
    """

    kind = "spline_kk"

    def __init__(self, references, group, group_labels, nodes_eV: Tensor, smoothness_sigma_e: float = 0.5,
                 change_sigma_e: float = 2.0, fine_step_eV: float = 0.05, margin_eV: float = 20.0,
                 cache_size: int = 4096):  # fmt: skip
        super().__init__(references, group, group_labels)
        nodes = torch.as_tensor(nodes_eV, dtype=torch.float64).reshape(-1)
        if nodes.numel() < 3 or not bool((nodes[1:] > nodes[:-1]).all()):
            raise ValueError("the spline_kk model needs at least three strictly increasing node energies")
        self.nodes_eV = nodes
        self.smoothness_sigma_e = float(smoothness_sigma_e)
        self.change_sigma_e = float(change_sigma_e)
        k = nodes.numel()
        low, high = nodes[1] - nodes[0], nodes[-1] - nodes[-2]
        padded = torch.cat([nodes[:1] - 2 * low, nodes[:1] - low, nodes, nodes[-1:] + high, nodes[-1:] + 2 * high])
        self._padded_eV = padded
        self._padded_basis = torch.cat([torch.zeros(k, 2), torch.eye(k), torch.zeros(k, 2)], 1).double()  # (K, K + 4)
        pieces = []
        for a, b in zip(padded[:-1].tolist(), padded[1:].tolist()):
            n = max(1, math.ceil((b - a) / fine_step_eV - 1e-9))
            pieces.append(torch.linspace(a, b, n + 1, dtype=torch.float64)[:-1])
        self.fine_eV = torch.cat(pieces + [padded[-1:]])
        self._fine_basis = self.change_basis(self.fine_eV).T.contiguous()  # (F, K)
        n_margin = math.ceil(margin_eV / fine_step_eV)
        step = torch.arange(1, n_margin + 1, dtype=torch.float64) * fine_step_eV
        self._query_eV = torch.cat([self.fine_eV[0] - step.flip(0), self.fine_eV, self.fine_eV[-1] + step])
        self._query_kk = self._exact_kramers_kronig_basis(self._query_eV)  # (K, Q)
        self._cache: OrderedDict[tuple[float, ...], tuple[Tensor, Tensor, Tensor, Tensor]] = OrderedDict()
        self.cache_size = int(cache_size)

    @property
    def n_nodes(self) -> int:
        return int(self.nodes_eV.numel())

    def change_basis(self, energy_eV: Tensor) -> Tensor:
        """(K, C) b_k(E): the change of f'' at ``energy_eV`` (C,) per unit change at node k."""
        e = torch.as_tensor(energy_eV, dtype=torch.float64).reshape(-1)
        return interpolate_cubic(e, self._padded_eV, self._padded_basis)

    def _exact_kramers_kronig_basis(self, e: Tensor, chunk: int = 512) -> Tensor:
        return torch.cat([(kramers_kronig_matrix(self.fine_eV, e[i : i + chunk]) @ self._fine_basis).T
                          for i in range(0, e.numel(), chunk)], 1)  # fmt: skip

    def kramers_kronig_basis(self, energy_eV: Tensor) -> Tensor:
        """(K, C) KK[b_k](E): the change of f' at ``energy_eV`` (C,) (all > 0) per unit change at node k."""
        e = torch.as_tensor(energy_eV, dtype=torch.float64).reshape(-1)
        inside = (e >= self._query_eV[0]) & (e <= self._query_eV[-1])
        out = interpolate_cubic(e, self._query_eV, self._query_kk)
        if not bool(inside.all()):
            out[:, ~inside] = self._exact_kramers_kronig_basis(e[~inside])
        return out

    def _matrices(self, energy_eV: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(f'_ref (S, C), f''_ref (S, C), b (C, K), KK[b] (C, K)) in float64 on the CPU, cached."""
        key = tuple(energy_eV.detach().reshape(-1).tolist())  # (tolist also works inside torch.func transforms)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        e = energy_eV.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        ref = [r.to(dtype=torch.float64).at(e) for r in self.references]
        entry = (torch.stack([a for a, _ in ref]), torch.stack([b for _, b in ref]), self.change_basis(e).T.contiguous(),
                 self.kramers_kronig_basis(e).T.contiguous())  # fmt: skip
        if _plain(entry[0]):
            self._cache[key] = entry
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    def _changes(self, theta: Tensor) -> Tensor:
        return theta.reshape(self.n_groups, self.n_nodes)

    def initial(self) -> Tensor:
        return torch.zeros(self.n_groups * self.n_nodes, dtype=torch.float64)

    def curves(self, theta: Tensor, energy_eV: Tensor) -> tuple[Tensor, Tensor]:
        fp_ref, fdp_ref, basis, kk = (m.to(device=theta.device, dtype=theta.dtype) for m in self._matrices(energy_eV))
        change = self._changes(theta)[self.group.to(theta.device)]  # (S, K)
        return fp_ref + change @ kk.T, fdp_ref + change @ basis.T

    def negative_log_prior(self, theta: Tensor) -> Tensor:
        d = self._changes(theta)
        second = d[:, 2:] - 2 * d[:, 1:-1] + d[:, :-2]
        return 0.5 * (second.pow(2).sum() / self.smoothness_sigma_e**2 + d.pow(2).sum() / self.change_sigma_e**2)

    def parameter_names(self) -> list[str]:
        nodes = [float(e) for e in self.nodes_eV]
        return [f"f_double_prime_change[{label}]@{e:.1f}eV" for label in self.group_labels for e in nodes]
