"""The learned correction of the physics model's per-channel profiles (pure torch).

The physics rate of a shoebox pixel is lambda = plane + G sum_c P_c(p) |F_h(E_c)|^2
(:mod:`spread_dials.refine.model`).  The correction acts on the per-channel profiles P, so the
corrected rate keeps that form and dials.spread_refine's engine (stage 1, the Fisher information,
the scoring step) runs on corrected profiles unchanged:

    P*_c(p) = exp(log_gain(p) + head(p)) * (K P_c)(p)

- ``log_gain``: a smooth gain field per panel, bicubic over a coarse grid of nodes (detector gain
  non-uniformity; the background plane of each shoebox absorbs the gain's effect on background
  over the few pixels of a shoebox, so the gain multiplies the Bragg part only: a departure from
  CORRECT_DESIGN.md, which multiplies background too, that keeps the rate in the engine's form).
- ``K``: a flux-conserving redistribution (PSF, spot-shape errors): K x = x + sum_o c_o (move
  x_p to its neighbour p + o) - (x_p leaves p).  With ``shoebox_boundary="open"`` (default) a
  move whose neighbour lies outside the shoebox takes the photons off the shoebox, as a point
  spread carries them onto pixels outside it: K is then the convolution with the stencil, zero
  outside the box, and the photons are conserved on the detector.  With ``"closed"`` such moves
  are not made, so every shoebox's total is kept exactly for any coefficients c.  Measured (H200,
  20 rubredoxin stills, PSF FWHM 1.5 px, 2 px box margins): the physics given the exact PSF
  recovers the edge shift (2.024 and 2.001 eV, truth 2, sigma 0.026, two seeds), the physics
  given the same PSF with closed boxes does not (1.286, 2.54 eV: 20-26 sigma), because the light
  a spot loses through its box's edges depends on where in the box each channel's photons fall.
- ``head``: a smooth function of the reflection's direction in the crystal frame and its
  resolution, one value per shoebox (partiality errors such as an anisotropic mosaic spread; no
  feature that resolves positions inside a spot, which would be a proxy for the energy:
  :mod:`~spread_dials.correct.context`): a linear combination of the 14 monomials of degree 1 and
  2 of z = tanh(standardized feature), with a Gaussian prior on each coefficient.  Its slope is
  at most 2 ||w||_1 per unit of a standardized feature (:meth:`PixelCorrection.head_slope_bound`:
  each term's gradient has norm <= 2 when |z| <= 1 and |dz/dx| <= 1), so it cannot follow the
  pseudo-random sign of a site's phase from one Miller index to the next.  The bound is
  reported, not imposed: a hard bound (a rescaling of the weights, then a projection onto the
  1-norm ball) left the head pinned at the bound and the fit stalled or ran off (toy, 2 stills:
  site B -4.3 eV for truth 0 with the projection).  A departure from an MLP
  (CORRECT_DESIGN.md): the fit is Gauss-Newton on few, identifiable weights, and the smooth basis
  is itself a guard.

Every part is zero at initialisation, so the corrected profile equals the physics one exactly.
The inputs are a :class:`~spread_dials.correct.context.PixelContext` only (no Miller index, F0,
G, |F|^2 or spectrum: the guards of CORRECT_DESIGN.md).

:class:`LeakyCorrection` is the deliberately leaky arm: the same parts plus a free log factor per
Miller index, no anchor; it can absorb the anomalous signal, so a test that it does shows the
guard tests have power.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spread_dials.correct.context import (
    DEFAULT_STENCIL_RADIUS,
    HEAD_FEATURES,
    PixelContext,
    stencil_offsets,
    stencil_orbits,
)

__all__ = ["CorrectionSettings", "PixelCorrection", "LeakyCorrection", "channel_polynomials", "redistribute", "stencil_moves", "within_capacity"]


@dataclass(frozen=True)
class CorrectionSettings:
    """Shape of the correction and its priors.

    Attributes:
        gain: learn the gain field; gain_nodes: nodes per panel edge (1: one gain per panel);
            gain_prior_sigma: prior sd of the log gain at each node (0.05: 5 %).
        redistribution: learn the stencil; stencil_radius: its half-width (pixels);
            stencil_prior_sigma: prior sd of each coefficient (fraction of a pixel's photons moved);
            stencil_symmetry: ``none`` (a weight per offset) or ``d4`` (a weight per orbit of the
            square's symmetries: 2 for radius 1, 5 for radius 2; a symmetric point spread).
            Radius 2 with d4 by default: with radius 1 a 1.5 px PSF left a common +0.18 eV
            (7 sigma) on 20 rubredoxin stills, radius 2 + d4 +0.045; the same calibration on
            the toy (benchmarks/RESULTS.md session 18).
        shoebox_boundary: ``open`` (photons moved off a shoebox leave it) or ``closed`` (they
            stay; each shoebox's total kept).
        head: learn the intensity head (off by default: on the toy with a PSF it moved site A
            by 2.4 sigma from where the stencil alone agrees with the oracle; why is not
            understood yet); head_prior_sigma: prior sd of each coefficient (log intensity).
    """

    gain: bool = True
    gain_nodes: int = 2
    gain_prior_sigma: float = 0.05
    redistribution: bool = True
    stencil_radius: int = DEFAULT_STENCIL_RADIUS
    stencil_prior_sigma: float = 0.1
    stencil_symmetry: str = "d4"
    shoebox_boundary: str = "open"
    head: bool = False
    head_prior_sigma: float = 0.05


def within_capacity(settings: CorrectionSettings, n_shoeboxes: int, n_panels: int, per_weight: float) -> tuple[CorrectionSettings, list[str]]:
    """``settings`` with each part switched off whose weights the data cannot pin down: a part
    with k weights needs at least ``per_weight`` * k shoeboxes (the gain: per panel, on average
    over the ``n_panels`` panels).  A weight informed by few reflections can follow their
    pseudo-random anomalous differences (a gain node per reflection absorbs the signal as a
    free factor per Miller index would); with many, those average out.  Returns the settings and
    one message per part switched off."""
    from dataclasses import replace

    notes = []
    f = len(HEAD_FEATURES)
    parts = {"gain": (settings.gain_nodes**2, n_shoeboxes / max(n_panels, 1), "shoeboxes per panel"),
             "redistribution": (_stencil_weights(settings), n_shoeboxes, "shoeboxes"),
             "head": (f + f * (f + 1) // 2, n_shoeboxes, "shoeboxes")}  # fmt: skip
    for name, (k, have, unit) in parts.items():
        if getattr(settings, name) and have < per_weight * k:
            settings = replace(settings, **{name: False})
            notes.append(f"correction.{name} off: {have:.0f} {unit} for its {k} weights (needs >= {per_weight:g} per weight, "
                         "correct.min_shoeboxes_per_weight)")  # fmt: skip
    return settings, notes


def _stencil_weights(settings: CorrectionSettings) -> int:
    """Free weights of the stencil (its offsets, or their orbits under ``stencil_symmetry``)."""
    return int(stencil_orbits(stencil_offsets(settings.stencil_radius), settings.stencil_symmetry).max()) + 1


def _monomials(z: Tensor) -> Tensor:
    """(N, F + F (F + 1) / 2) the monomials of degree 1 and 2 of z (N, F)."""
    i, j = torch.triu_indices(z.shape[-1], z.shape[-1])
    return torch.cat([z, z[:, i] * z[:, j]], -1)


def redistribute(x: Tensor, coefficients: Tensor, neighbours: Tensor, open_boundary: bool = True) -> Tensor:
    """K x: ``x`` (N, ...) per pixel with, for each stencil offset o, a fraction c_o of every
    pixel's value moved to its neighbour at o (``neighbours`` (K, N), -1 outside the shoebox,
    for the offsets of :func:`~spread_dials.correct.context.stencil_offsets`, whose order is
    symmetric: offset K - 1 - k is minus offset k).  A move to outside the shoebox takes the value
    off it (``open_boundary``: K x is the convolution with the stencil, zero outside the box) or
    is not made (each shoebox's sum kept exactly).  Linear in x.  Written with gathers only (the
    photons arriving at p from offset o come from the pixel at p - o): no scatter-add, so the
    result does not depend on the order of floating-point additions.  As
    (1 - sum_o c_o m_o(p)) x_p + sum_o c_o x_(p - o), m_o(p) = 1 where the move is made, with x
    padded by a zero row for the sources outside the box: one gather and one multiply-add of x's
    size per offset (five before: 1.9x slower on this 2-core CPU for a rubredoxin still's (N, 40, 7)
    profiles and Jacobian)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    padded, sources, made = _stencil_moves(x, neighbours, open_boundary)
    out = (1 - (coefficients.to(x.dtype).unsqueeze(-1) * made).sum(0)).view(shape) * x
    for j in range(len(coefficients)):
        out = out + coefficients[j] * padded[sources[j]]
    return out


def stencil_moves(x: Tensor, neighbours: Tensor, open_boundary: bool = True) -> Tensor:
    """(N, K) d (K x) / d c_o for per-pixel values ``x`` (N,): the value arriving at each pixel
    from offset o less the value leaving it (:func:`redistribute` is linear in its
    coefficients, K x = x + sum_o c_o moves_o), in one gather."""
    padded, sources, made = _stencil_moves(x, neighbours, open_boundary)
    return (padded[sources] - made * x).T


def _stencil_moves(x: Tensor, neighbours: Tensor, open_boundary: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(x with a zero row appended, (K, N) the source pixel p - o_k of each offset's photons
    arriving at p (the zero row outside the box), (K, N) 1 where the photons leaving p for p + o_k
    are moved)."""
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
    sources = torch.where(neighbours >= 0, neighbours, x.shape[0]).flip(0)
    made = torch.ones_like(neighbours, dtype=x.dtype) if open_boundary else (neighbours >= 0).to(x.dtype)
    return padded, sources, made


class PixelCorrection(nn.Module):
    """The correction (module docstring) for detectors of ``n_panels`` panels.

    Args:
        n_panels: panels of the detector.
        settings: shape and priors.
        features: (2, 4) mean and standard deviation of each head feature (:data:`HEAD_FEATURES`)
            over the data set (:func:`~spread_dials.correct.fit.feature_statistics`): the head
            sees standardized inputs and is 0 at the mean.

    Neither part can change the overall intensity, which the per-shot scales own (an overall
    factor would wander with them): the log gain is centred over all nodes of the detector and
    the head is measured from its value at the mean features.
    """

    def __init__(self, n_panels: int, settings: CorrectionSettings, features: Tensor, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.settings = settings
        g = settings.gain_nodes
        self.log_gain_nodes = nn.Parameter(torch.zeros((n_panels, 1, g, g), dtype=dtype))
        self.offsets = stencil_offsets(settings.stencil_radius)
        self.register_buffer("stencil_orbit", stencil_orbits(self.offsets, settings.stencil_symmetry))
        self.stencil = nn.Parameter(torch.zeros(_stencil_weights(settings), dtype=dtype))
        self.register_buffer("feature_mean", features[0].to(dtype))
        self.register_buffer("feature_scale", features[1].to(dtype).clamp(min=1e-12))
        f = len(HEAD_FEATURES)
        self.head_weights = nn.Parameter(torch.zeros(f + f * (f + 1) // 2, dtype=dtype))

    def log_gain(self, context: PixelContext) -> Tensor:
        """(N,) log gain of every pixel (0 when the gain is not learned): torch's bicubic
        interpolation (grid_sample, align_corners) of the panel's nodes, written as fixed
        per-pixel weights of the nodes so that it is linear in them (and twice
        differentiable, as the Jacobians of :mod:`spread_dials.refine.derivatives` need)."""
        if not self.settings.gain:
            return torch.zeros_like(context.panel_xy[:, 0])
        return (self._node_weights(context) * self.node_log_gains()[context.panel]).sum(-1)

    def node_log_gains(self) -> Tensor:
        """(panels, g^2) the log gain at each panel's nodes: the nodes' weights less their mean
        over the detector (the field's values at its nodes)."""
        return (self.log_gain_nodes - self.log_gain_nodes.mean()).reshape(self.log_gain_nodes.shape[0], -1)

    def _node_weights(self, context: PixelContext) -> Tensor:
        """(N, g^2) each pixel's bicubic weights of its panel's gain nodes."""
        g = self.settings.gain_nodes
        dtype = self.log_gain_nodes.dtype
        basis = torch.eye(g * g, dtype=dtype, device=context.panel_xy.device).view(1, g * g, g, g)
        grid = context.panel_xy.to(dtype).view(1, -1, 1, 2)
        weights = nn.functional.grid_sample(basis, grid, mode="bicubic", padding_mode="border", align_corners=True)
        return weights.view(g * g, -1).T

    def head(self, context: PixelContext) -> Tensor:
        """(N,) log intensity factor of every pixel (0 when the head is not learned)."""
        if not self.settings.head:
            return torch.zeros_like(context.panel_xy[:, 0])
        return self._head_monomials(context) @ self.head_weights

    def _head_monomials(self, context: PixelContext) -> Tensor:
        """(N, F + F (F + 1) / 2) the head's basis at each pixel: the monomials of the
        standardized features squashed by tanh."""
        z = torch.tanh((context.head_features.to(self.feature_scale.dtype) - self.feature_mean) / self.feature_scale)
        return _monomials(z)

    def head_slope_bound(self) -> float:
        """2 ||w||_1: a bound on |d head / d feature| (log intensity per unit of a standardized
        feature) at the current weights (0 when the head is not learned)."""
        return 2.0 * float(self.head_weights.detach().abs().sum()) if self.settings.head else 0.0

    def coefficients(self) -> Tensor:
        """(K,) stencil coefficient of every offset (its orbit's weight under
        ``stencil_symmetry``; 0 when the redistribution is not learned)."""
        c = self.stencil[self.stencil_orbit]
        return c if self.settings.redistribution else torch.zeros_like(c)

    def factor(self, context: PixelContext) -> Tensor:
        """(N,) exp(log_gain + head): the multiplicative part."""
        return torch.exp(self.log_gain(context) + self.head(context))

    def apply(self, profile: Tensor, context: PixelContext, **_) -> Tensor:
        """Corrected profiles: exp(log_gain + head) K ``profile`` for (N, ...) per-pixel values
        (profiles (N, C), their offsets' Jacobian (N, C, k)); linear in ``profile``."""
        return self._pixel_apply(profile, context)

    def _pixel_apply(self, profile: Tensor, context: PixelContext) -> Tensor:
        """exp(log_gain + head) K ``profile``: the part of every correction that sees no Miller index."""
        if tuple(context.offsets) != tuple(self.offsets):
            raise ValueError(f"context made for stencil offsets {context.offsets}, correction has {self.offsets}")
        open_boundary = self.settings.shoebox_boundary == "open"
        moved = (redistribute(profile, self.coefficients(), context.neighbours, open_boundary)
                 if self.settings.redistribution else profile)  # fmt: skip
        f = self.factor(context)
        return f.view(-1, *([1] * (profile.dim() - 1))) * moved

    def jacobian(self, values: Tensor, context: PixelContext) -> tuple[Tensor, Tensor]:
        """(corrected (N,), d corrected / d weights (N, Q)) of per-pixel ``values`` (N,) at the
        current weights, in closed form; the columns in the order of :meth:`learned` (each
        parameter flattened), as ``torch.nn.utils.parameters_to_vector`` lays them out.

        With C = f K_c(x), f = exp(log_gain + head): d C / d node = C d log_gain / d node (the
        node's bicubic weight on its own panel, less each pixel's weight sum over the number of
        nodes, the centring); d C / d stencil weight = f sum over the weight's offsets o of
        (x arriving from p - o, less x leaving p), K being linear in the coefficients; d C / d
        head weight = C times the monomial.  Tested against autograd (tests/correct)."""
        corrected, factor = self._pixel_apply(values, context), self.factor(context)
        columns = []
        if self.settings.gain:
            g2 = self.settings.gain_nodes**2
            weights = self._node_weights(context)  # (N, g^2)
            d_log = weights.new_zeros((values.shape[0], self.log_gain_nodes.shape[0], g2))
            d_log[torch.arange(values.shape[0], device=values.device), context.panel] = weights
            d_log = d_log.view(values.shape[0], -1) - (weights.sum(-1, keepdim=True) / self.log_gain_nodes.numel())
            columns.append(corrected.unsqueeze(-1) * d_log)
        if self.settings.redistribution:
            per_offset = stencil_moves(values, context.neighbours, self.settings.shoebox_boundary == "open")  # (N, K)
            orbits = nn.functional.one_hot(self.stencil_orbit, self.stencil.numel()).to(values.dtype)  # (K, weights)
            columns.append(factor.unsqueeze(-1) * (per_offset @ orbits))
        if self.settings.head:
            columns.append(corrected.unsqueeze(-1) * self._head_monomials(context))
        jacobian = torch.cat(columns, -1) if columns else values.new_zeros((values.shape[0], 0))
        return corrected, jacobian

    def bragg_jacobian(self, profile: Tensor, weight: Tensor, context: PixelContext,
                       miller_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """(corrected Bragg term (N,), its derivative (N, Q_s) in the weights the pixels depend
        on, their indices (Q_s,) in the flat weights) of per-channel ``profile`` and ``weight``
        (N, C) (|F_h(E_c)|^2 of each pixel's reflection): this correction acts on the channel
        sum (it is linear and the same for every channel), so :meth:`jacobian` of
        sum_c P_c w_c, every weight's column (Q_s = Q).  ``miller_index`` is for the leaky arm."""
        corrected, jacobian = self.jacobian((profile * weight).sum(-1), context)
        return corrected, jacobian, torch.arange(jacobian.shape[1], device=jacobian.device)

    def learned(self) -> list[str]:
        """Names of the weights of the parts switched on (those the fit moves)."""
        s = self.settings
        return [n for n, on in (("log_gain_nodes", s.gain), ("stencil", s.redistribution), ("head_weights", s.head)) if on]

    def forward(self, profile: Tensor, context: PixelContext, **kwargs) -> Tensor:
        """:meth:`apply` (so torch.func.functional_call can differentiate in the weights)."""
        return self.apply(profile, context, **kwargs)

    def negative_log_prior(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Gaussian priors on the log gain at each node, the stencil coefficients and the head's
        coefficients (of the parts learned), at the module's weights or at ``weights`` (name ->
        tensor, as ``named_parameters``; differentiable in them)."""
        w = {**dict(self.named_parameters()), **(weights or {})}
        s = self.settings
        total = torch.zeros((), dtype=self.stencil.dtype, device=self.stencil.device)
        if s.gain:
            total = total + (w["log_gain_nodes"] ** 2).sum() / (2 * s.gain_prior_sigma**2)
        if s.redistribution:
            total = total + (w["stencil"] ** 2).sum() / (2 * s.stencil_prior_sigma**2)
        if s.head:
            total = total + (w["head_weights"] ** 2).sum() / (2 * s.head_prior_sigma**2)
        return total


class LeakyCorrection(PixelCorrection):
    """The leaky arm: :class:`PixelCorrection` times a free factor per Miller index h and
    spectrum channel c, exp(sum_k a_hk B_kc) (it is given h and the spectrum, so it can mimic
    |F_h(E_c)|^2 of any f', f'' and absorb the edge shifts); no anchor.  ``energy_basis``
    B (K, C): None for the identity (a free factor per h and channel: K = C weights per
    reflection, the toy's arm), or a few smooth functions of the channel
    (:func:`channel_polynomials`: K = degree + 1 weights per reflection, which keeps the
    information matrix small enough for data sets of thousands of reflections).  ``prior_sigma``:
    None for no prior on a (the toy's arm), or a Gaussian prior's width (log intensity), which
    keeps reflections the data barely see from running off.  Acts on per-channel profiles only
    (:attr:`per_channel`); the stills must share their channel count."""

    per_channel = True

    def learned(self) -> list[str]:
        return [*super().learned(), "per_reflection"]

    def __init__(self, n_panels: int, settings: CorrectionSettings, features: Tensor, miller_index: Tensor,
                 n_channels: int, dtype: torch.dtype = torch.float64, energy_basis: Tensor | None = None,
                 prior_sigma: float | None = None):  # fmt: skip
        super().__init__(n_panels, settings, features, dtype)
        self.prior_sigma = prior_sigma
        self.register_buffer("miller_index", torch.unique(miller_index, dim=0))
        basis = torch.eye(n_channels, dtype=dtype) if energy_basis is None else energy_basis.to(dtype)
        if basis.dim() != 2 or basis.shape[1] != n_channels:
            raise ValueError(f"energy_basis must be (K, {n_channels}), not {tuple(basis.shape)}")
        self.register_buffer("energy_basis", basis)
        self.per_reflection = nn.Parameter(torch.zeros((self.miller_index.shape[0], basis.shape[0]), dtype=dtype))

    def take_parts(self, parts: PixelCorrection) -> None:
        """Set this correction's gain, stencil and head weights to those of ``parts`` (a fitted
        :class:`PixelCorrection` of the same settings and features), the factors untouched: at
        factors 0 the leaky model is then ``parts`` itself, so a leaky fit started there need
        not relearn them (from the identity, its first joint step threw the factors out on 10
        rubredoxin stills, H200 session 30).

        Raises:
            ValueError: ``parts`` of other settings or features (its weights do not match).
        """
        own = {k: v for k, v in self.state_dict().items() if k not in ("per_reflection", "miller_index", "energy_basis")}
        theirs = parts.state_dict()
        if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
            raise ValueError("the parts' weights do not match this correction's (other settings or features)")
        self.load_state_dict(theirs, strict=False)

    def negative_log_prior(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        """:meth:`PixelCorrection.negative_log_prior`, plus with ``prior_sigma`` a Gaussian prior
        of that width on every a_hk: without one, a reflection the data barely see can take a
        factor of e^100 in one Newton step (2 rubredoxin stills, degree 2, CPU), and the
        information matrix overflows."""
        total = super().negative_log_prior(weights)
        if self.prior_sigma is None:
            return total
        a = (weights or {}).get("per_reflection", self.per_reflection)
        return total + (a**2).sum() / (2 * self.prior_sigma**2)

    def jacobian(self, values: Tensor, context: PixelContext) -> tuple[Tensor, Tensor]:
        """Not for the leaky arm, whose factor depends on the channel: see :meth:`bragg_jacobian`."""
        raise NotImplementedError("the leaky correction acts per channel: use bragg_jacobian")

    def _rows(self, miller_index: Tensor) -> Tensor:
        """(B,) each shoebox's row of :attr:`per_reflection`."""
        return torch.searchsorted(_keys(self.miller_index), _keys(miller_index))

    def channel_factor(self, context: PixelContext, miller_index: Tensor) -> Tensor:
        """(N, C) exp(sum_k a_hk B_kc) of every pixel's reflection h and channel c."""
        return torch.exp(self.per_reflection[self._rows(miller_index)] @ self.energy_basis)[context.shoebox]

    def apply(self, profile: Tensor, context: PixelContext, miller_index: Tensor | None = None, **_) -> Tensor:
        """As :meth:`PixelCorrection.apply` for per-channel ``profile`` (N, C, ...), times each
        pixel's reflection and channel factor (``miller_index`` (B, 3) of the still's shoeboxes)."""
        out = self._pixel_apply(profile, context)
        f = self.channel_factor(context, miller_index)
        return f.view(*f.shape, *([1] * (profile.dim() - 2))) * out

    def bragg_jacobian(self, profile: Tensor, weight: Tensor, context: PixelContext,
                       miller_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """As :meth:`PixelCorrection.bragg_jacobian`, in closed form.  The factor is constant
        over a shoebox and the rest of the correction C is linear in the profile and mixes pixels
        of one shoebox only, so sum_c w_c f_c C(P_c) = C(sum_c w_c f_c P_c): the base weights'
        columns are :meth:`PixelCorrection.jacobian` of that sum, and a_hk's column is
        C(sum_c w_c f_c B_kc P_c) on the pixels of reflection h (0 elsewhere).  Only the
        reflections of ``miller_index`` (the still's shoeboxes, (B, 3)) have columns: the other
        a_hk's are 0 on these pixels (a still sees ~50 of a data set's thousands of reflections,
        so its information matrix is ~(50 K)^2, not (H K)^2)."""
        fw = self.channel_factor(context, miller_index) * weight  # (N, C)
        corrected, base = super().jacobian((profile * fw).sum(-1), context)
        moments = self._pixel_apply(torch.einsum("nc,nc,kc->nk", profile, fw, self.energy_basis), context)  # (N, K)
        k = torch.arange(self.energy_basis.shape[0], device=moments.device)
        present, local = torch.unique(self._rows(miller_index), return_inverse=True)  # the still's reflections
        leaky = moments.new_zeros((moments.shape[0], present.numel() * k.numel()))
        leaky.scatter_(1, local[context.shoebox].unsqueeze(-1) * k.numel() + k, moments)
        index = torch.cat([torch.arange(base.shape[1], device=k.device), base.shape[1] + (present.unsqueeze(-1) * k.numel() + k).reshape(-1)])
        return corrected, torch.cat([base, leaky], -1), index


def channel_polynomials(n_channels: int, degree: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(degree + 1, n_channels) the Legendre polynomials P_0..P_degree of the channel index
    mapped onto [-1, 1]: smooth functions of the energy across a spectrum of equally spaced
    channels, for :class:`LeakyCorrection`'s ``energy_basis``.

    Raises:
        ValueError: a negative degree.
    """
    if degree < 0:
        raise ValueError(f"the degree must be >= 0, not {degree}")
    x = torch.linspace(-1.0, 1.0, n_channels, dtype=dtype) if n_channels > 1 else torch.zeros(1, dtype=dtype)
    return torch.stack([torch.special.legendre_polynomial_p(x, k) for k in range(degree + 1)])


def edge_shift_basis(references, energy_eV: Tensor, degree: int = 1) -> Tensor:
    """(2 S (degree + 1), C) the edge-shift derivatives d f'/ds and d f''/ds (e per eV) of each
    of the S ``references`` (TabulatedCurve, moved by s: f(E - s)) at the channel energies
    ``energy_eV`` (C,) (eV), each times the Legendre polynomials P_0..P_degree of the channel
    (:func:`channel_polynomials`), every row scaled to a largest magnitude of 1.  As a
    :class:`LeakyCorrection` ``energy_basis`` it spans, per reflection, the first-order change
    of log |F_h(E)|^2 with any site's edge shift (whose coefficients, d log |F_h|^2 / d f' and
    d f'', vary smoothly across a spectrum): a leak of exactly the signal the guards keep out.

    Raises:
        ValueError: a negative degree, no references, or a reference whose derivatives vanish on
            every channel (a spectrum away from its edge).
    """
    if not references:
        raise ValueError("edge_shift_basis needs at least one reference curve")
    polynomials = channel_polynomials(energy_eV.numel(), degree, energy_eV.dtype).to(energy_eV.device)
    rows = []
    for reference in references:
        shift = torch.zeros_like(energy_eV, requires_grad=True)  # one per channel: f_c depends on its own only
        curves = reference.to(energy_eV.device, energy_eV.dtype).at(energy_eV, shift)
        for k, f in enumerate(curves):
            (derivative,) = torch.autograd.grad(f.sum(), shift, retain_graph=k == 0)
            scaled = derivative * polynomials  # (degree + 1, C)
            peak = scaled.abs().amax(-1, keepdim=True)
            if not bool((peak > 0).all()):
                raise ValueError(f"the edge-shift derivative of {reference.label or 'a reference'} vanishes on every channel")
            rows.append(scaled / peak)
    return torch.cat(rows)


def energy_basis(kind: str, degree: int, references, energy_eV: Tensor) -> Tensor:
    """(K, C) a :class:`LeakyCorrection` ``energy_basis`` at the channel energies ``energy_eV``
    (C,) (eV): ``kind`` "polynomial", :func:`channel_polynomials` of ``degree``; "edge",
    :func:`edge_shift_basis` of the ``references`` (TabulatedCurve) times those polynomials.

    Raises:
        ValueError: another kind, or as the two functions.
    """
    if kind == "polynomial":
        return channel_polynomials(energy_eV.numel(), degree, energy_eV.dtype).to(energy_eV.device)
    if kind == "edge":
        return edge_shift_basis(references, energy_eV, degree)
    raise ValueError(f"an energy basis is 'polynomial' or 'edge', not {kind!r}")


def _keys(hkl: Tensor) -> Tensor:
    """(B,) one sortable integer per Miller index (|h|, |k|, |l| < 2^20); torch.unique sorts rows
    lexicographically, which this key preserves."""
    h = hkl.to(torch.long) + (1 << 20)
    return (h[:, 0] << 42) | (h[:, 1] << 21) | h[:, 2]
