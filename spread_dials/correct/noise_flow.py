"""The learned pixel noise of charge-integrating detectors: a conditional normalizing flow on the
standardized residuals (the design's P*, CORRECT_DESIGN.md (d); pure torch + zuko).

A charge-integrating pixel (JUNGFRAU, ePix, a CCD) does not count photons: each photon's charge
varies (charge sharing, gain), and readout noise is added, so a count k given the model's rate
lambda is not Poisson and is Gaussian only roughly.  The Gaussian-readout likelihood
(``likelihood=gaussian_readout``) standardizes z = (k - lambda) / sqrt(v), v = lambda + sigma^2
(+ (f lambda)^2), and takes z ~ N(0, 1).  Here z ~ q(z | c) instead, a flow conditioned on the
pixel's rate only, c = log(1 + lambda) / :data:`CONTEXT_SCALE`:

    u = S_c(a_c z + b_c)  ~  N(0, 1),    q(z | c) = N(u) |du/dz|,

an affine map then a monotonic rational-quadratic spline on [-``bound``, ``bound``] (identity
outside it), both from small MLPs of c (zuko's ``MaskedAutoregressiveTransform`` with one
feature).  The refinement uses q through its variance only (below).  The flow sees neither the Miller
index, F0, G, |F|^2, the spectrum nor a derivative in the edge shifts, and c only through the
predicted rate (the design's allowed "predicted total"): it can widen, narrow, skew or shift the
noise as a function of brightness, never follow the sign of an anomalous difference from one
reflection to the next.

Initialised to the identity (every MLP's last layer zero): q = N(0, 1), so the likelihood is
exactly the Gaussian readout's.  Fitted by :func:`fit_residual_flow` (torch.optim.Adam) to the
fitted pixels' residuals at fixed rates, with an anchor beta_f sum_g KL(q(. | c_g) || N(0, 1))
over a grid of contexts spanning the data (weak: it decides only where pixels are few).

The pixel's likelihood term is 0.5 (P(c) z^2 + log v) and its Fisher weight P(c) / v, with
P(c) = 1 / Var_q(z | c) the precision factor (:meth:`ResidualFlow.precision_factor`, by
quadrature over the base's quantiles, tabulated on :data:`PRECISION_NODES` contexts) held as a
weight at the current rate: a quasi-likelihood with the variance v / P that the flow learned
(:func:`~spread_dials.refine.model.pixel_nll`).  The flow's full density -log q(z | c) was the
first likelihood: on data with nothing to learn it moved the edge shifts by 0.4 sigma rms,
following the shape of a flow fitted to a few hundred bright pixels (benchmarks/RESULTS.md,
sessions 19-20).  The residuals it is fitted to are studentized by each pixel's leverage on its
still's own parameters (:func:`~spread_dials.refine.residuals.still_leverage`): the bright pixels
that pin a still's scale and orientation are narrower at the fit than the noise (studentized by
the plane only, the flow learned a precision above 1 there).  A refit is kept only if its
variance predicts held-out pixels better than N(0, 1) (:func:`held_out_gain`,
``CorrectSettings.flow_significance``).  The weight is not the
location information E_q[(d log q / dz)^2] of the flow (equal for a normal q, larger otherwise):
that is a functional of q's derivative, which a flow fitted to a few hundred bright pixels makes
wiggle (measured on the toy: 0.75-2.7 where the truth was 0.51), whereas the variance is a
smooth functional of q.  The reported intervals are therefore conservative where the noise is
far from normal, never too narrow because the flow wiggles.

Why zuko: a maintained implementation of the spline transform and its inverse (the project's
rule: a library over our own code outside what the project exists for).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from zuko.distributions import DiagNormal
from zuko.flows import Flow
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import UnconditionalDistribution
from zuko.transforms import MonotonicAffineTransform, MonotonicRQSTransform

__all__ = ["CONTEXT_SCALE", "PRECISION_NODES", "ResidualFlow", "rate_context", "held_out_gain", "fit_residual_flow"]

#: c = log(1 + lambda) / CONTEXT_SCALE keeps c within ~[0, 3] for rates up to ~1e6 photons
CONTEXT_SCALE = 4.0
#: contexts on which the precision factor is tabulated (linear interpolation between them)
PRECISION_NODES = 33
#: base quantiles of the quadrature over q (KL and precision factor)
QUADRATURE_POINTS = 64


def rate_context(lam: Tensor) -> Tensor:
    """(N, 1) the flow's context c = log(1 + lambda) / CONTEXT_SCALE of rates ``lam`` (N,) (photons)."""
    return (torch.log1p(lam.clamp(min=0)) / CONTEXT_SCALE).unsqueeze(-1)


class ResidualFlow(nn.Module):
    """q(z | c) of the standardized residual z given the pixel's rate (module docstring).

    Args:
        bins: spline bins.
        hidden: width of each MLP's two hidden layers.
        bound: the spline's domain [-bound, bound] (standard deviations).
    """

    def __init__(self, bins: int = 4, hidden: int = 16, bound: float = 6.0) -> None:
        super().__init__()
        self.bins, self.hidden, self.bound = bins, hidden, bound
        affine = MaskedAutoregressiveTransform(features=1, context=1, univariate=MonotonicAffineTransform,
                                               shapes=[(), ()], hidden_features=[hidden, hidden])  # fmt: skip
        spline = MaskedAutoregressiveTransform(features=1, context=1, hidden_features=[hidden, hidden],
                                               univariate=lambda *phi: MonotonicRQSTransform(*phi, bound=bound),
                                               shapes=[(bins,), (bins,), (bins - 1,)])  # fmt: skip
        base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(1), scale=torch.ones(1), buffer=True)
        self.flow = Flow([affine, spline], base)
        quantiles = (torch.arange(QUADRATURE_POINTS, dtype=torch.float64) + 0.5) / QUADRATURE_POINTS
        self.register_buffer("base_points", math.sqrt(2.0) * torch.erfinv(2 * quantiles - 1))
        self.register_buffer("precision_table", torch.ones(PRECISION_NODES, dtype=torch.float64))
        self.register_buffer("context_range", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity q = N(0, 1): every MLP's last layer zero, the precision table 1."""
        for transform in self.flow.transform.transforms:
            last = transform.hyper[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.precision_table.fill_(1.0)
        self.context_range.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64))

    def _cast(self, x: Tensor) -> Tensor:
        """``x`` in the dtype and on the device of the flow's weights."""
        weight = next(self.parameters())
        return x.to(dtype=weight.dtype, device=weight.device)

    def log_density(self, z: Tensor, lam: Tensor) -> Tensor:
        """(N,) log q(z | c) of residuals ``z`` (N,) of pixels with rates ``lam`` (N,) (photons), in z's dtype."""
        return self.flow(self._cast(rate_context(lam))).log_prob(self._cast(z).unsqueeze(-1)).to(z.dtype)

    def normalize(self, z: Tensor, lam: Tensor) -> Tensor:
        """(N,) u = T_c(z), the base variable of residuals ``z`` (N,) of pixels with rates ``lam``
        (N,): N(0, 1) where the learned noise is right (z itself at the identity), in z's dtype."""
        return self.flow(self._cast(rate_context(lam))).transform(self._cast(z).unsqueeze(-1))[:, 0].to(z.dtype)

    def _quadrature(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(z (G, M), log q(z) (G, M)) at the M base quantiles mapped back through the flow at each
        of the G contexts (differentiable in the flow's weights)."""
        context = self._cast(context)
        g, m = context.shape[0], self.base_points.numel()
        u = self._cast(self.base_points).expand(g, m).reshape(-1, 1)
        transform = self.flow(context.repeat_interleave(m, 0)).transform
        z = transform.inv(u)
        normal = DiagNormal(torch.zeros_like(u[0]), torch.ones_like(u[0]))
        log_q = normal.log_prob(u) + transform.log_abs_det_jacobian(z, u).reshape(-1)
        return z.view(g, m), log_q.view(g, m)

    def divergence(self, context: Tensor) -> Tensor:
        """(G,) KL(q(. | c_g) || N(0, 1)) at contexts (G, 1), by quadrature over the base's quantiles."""
        z, log_q = self._quadrature(context)
        return (log_q + 0.5 * z**2 + 0.5 * math.log(2 * math.pi)).mean(-1)

    def _precision(self, context: Tensor) -> Tensor:
        """(G,) 1 / Var_q(z | c_g) at contexts (G, 1), by quadrature (the M midpoint quantiles give
        the identity a variance of 0.98: divided out, so that the identity's factor is 1)."""
        with torch.no_grad():
            z, _ = self._quadrature(context)
        return ((self.base_points**2).mean() / z.double().var(-1, correction=0)).detach()

    @torch.no_grad()
    def tabulate(self, lam: Tensor) -> None:
        """Tabulate the precision factor on :data:`PRECISION_NODES` contexts spanning
        the rates ``lam`` (N,) (photons); call after every change of the weights."""
        contexts = rate_context(lam)
        low, high = float(contexts.min()), float(contexts.max())
        high = max(high, low + 1e-6)
        nodes = torch.linspace(low, high, PRECISION_NODES, dtype=torch.float64).unsqueeze(-1)
        table = self._precision(nodes)
        self.precision_table.copy_(table)
        self.context_range.copy_(torch.tensor([low, high], dtype=torch.float64))

    def precision_factor(self, lam: Tensor) -> Tensor:
        """(N,) the precision factor 1 / Var_q(z | c) of pixels with rates ``lam`` (N,) (photons),
        interpolated from the table (:meth:`tabulate`; 1 everywhere before it, as for the
        identity).  Rates outside the tabulated range take the nearest end."""
        context = rate_context(lam)
        low, high = self.context_range.tolist()
        position = ((context[:, 0].double() - low) / (high - low) * (PRECISION_NODES - 1)).clamp(0, PRECISION_NODES - 1)
        left = position.floor().long().clamp(max=PRECISION_NODES - 2)
        frac = position - left
        table = self.precision_table.to(position.device)
        return ((1 - frac) * table[left] + frac * table[left + 1]).to(context.dtype)


def held_out_gain(flow: ResidualFlow, z: Tensor, lam: Tensor) -> tuple[float, float]:
    """How much better the flow's variance predicts held-out residuals ``z`` (N,) of pixels with
    rates ``lam`` (N,) than N(0, 1): the mean over the pixels of the Gaussian log-likelihood
    gain d = 0.5 (log P - (P - 1) z^2), P the flow's precision factor, and its standard error
    (sd(d) / sqrt(N)); (0, 0) for fewer than 2 pixels.  It compares variances only (the likelihood
    uses nothing else of q, :func:`~spread_dials.refine.model.pixel_nll`), so a skew the flow
    learned does not count."""
    if z.numel() < 2:
        return 0.0, 0.0
    with torch.no_grad():
        p = flow.precision_factor(lam).to(z.dtype)
        d = 0.5 * (torch.log(p) - (p - 1) * z**2)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def fit_residual_flow(flow: ResidualFlow, z: Tensor, lam: Tensor, beta: float = 1.0, steps: int = 300,
                      learning_rate: float = 1e-2) -> list[float]:  # fmt: skip
    """Fit ``flow`` to residuals ``z`` (N,) of pixels with rates ``lam`` (N,) by Adam (full batch): minimise
    -sum log q(z_n | c_n) + beta * sum_g KL(q(. | c_g) || N(0, 1)) over 16 contexts spanning the
    data; then tabulate the precision factor.  Deterministic (no random draw).

    Returns:
        the loss per pixel after each step.
    """
    n = z.numel()
    context = rate_context(lam)
    grid = torch.linspace(float(context.min()), float(context.max()), 16, dtype=context.dtype).unsqueeze(-1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -flow.log_density(z, lam).sum() + beta * flow.divergence(grid).sum()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()) / n)
    flow.tabulate(lam)
    return losses
