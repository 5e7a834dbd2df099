"""How much of the edge-shift signal a leaky basis can absorb (issue 13's leaky arm).

The leaky arm multiplies each reflection h's per-channel intensity by exp(sum_k a_hk B_kc)
(correction.LeakyCorrection), so to first order it mimics any change of log |F_h(E_c)|^2 that lies
in the span of the rows of B.  An edge shift s of one site changes it by g_hc = d log |F_h(E_c)|^2
/ ds.  For each basis this prints, over the case's reflections (|F|^2 > 1 e^2 on every channel),
the fraction of g_h outside span(B) (median and 90th percentile of ||g_h - P g_h|| / ||g_h||, P the
projection onto the rows), and the fraction of the Poisson information sum_hc |F_hc|^2 g_hc^2 left
after it, whose inverse square root is roughly the factor by which the leaky arm's sigma exceeds
the physics arm's if nothing else limited it (a flat spectrum over the channels; one site).

Bases: polyD, Legendre polynomials of degree D in the channel (correction.channel_polynomials);
edgeD, the site's edge-shift derivatives of f', f'' times them (correction.edge_shift_basis).
g comes from central finite differences of the moved reference (h = 1e-4 eV), independent of the
basis's autograd.  With --at-shift s, g and |F|^2 are taken with the site already moved by s while
the basis stays the reference's (as the leaky arm's, built at s = 0): what is left where a fit that
has moved the edge sits.  One JSON line per run.

    python benchmarks/leaky_span.py --case rubredoxin --bases poly2,poly6,edge0,edge1,edge3
    python benchmarks/leaky_span.py --case rubredoxin --bases edge1 --at-shift -1.5
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spread_dials.correct.correction import energy_basis
from spread_dials.physics.anomalous import TabulatedCurve
from spread_dials.physics.structure_factors import StructureFactors


def log_intensity_derivative(table: StructureFactors, site: int, reference: TabulatedCurve, energy_eV: torch.Tensor,
                             step_eV: float = 1e-4, shift_eV: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(H, C) |F_h(E_c)|^2 (e^2) with ``site`` carrying ``reference`` moved by ``shift_eV`` and no
    other site anomalous, and d log |F_h(E_c)|^2 / ds (per eV) of that site's edge shift s there,
    by central differences of step ``step_eV``."""

    rows = torch.arange(table.n_reflections).unsqueeze(-1)
    channels = torch.arange(energy_eV.numel())

    def intensity(shift: float) -> torch.Tensor:
        fp, fdp = reference.at(energy_eV, shift)
        one_site = replace(table, G=table.G[:, site : site + 1], f_prime=fp.unsqueeze(0), f_double_prime=fdp.unsqueeze(0))
        return one_site.intensity(rows, channels)

    up, down = intensity(shift_eV + step_eV), intensity(shift_eV - step_eV)
    return intensity(shift_eV), (up.log() - down.log()) / (2 * step_eV)


def _parse_basis(name: str) -> tuple[str, str]:
    """("poly" or "edge", the degree's digits) of a basis name.

    Raises:
        ValueError: another name.
    """
    kind, degree = name[:4], name[4:]
    if kind not in ("poly", "edge") or not degree.isdigit():
        raise ValueError(f"a basis is polyD or edgeD (D a degree), not {name!r}")
    return kind, degree


def basis_named(name: str, reference: TabulatedCurve, energy_eV: torch.Tensor) -> torch.Tensor:
    """(K, C) the basis ``name``: "polyD" or "edgeD" (D the degree).

    Raises:
        ValueError: another name.
    """
    kind, degree = _parse_basis(name)
    return energy_basis("polynomial" if kind == "poly" else "edge", int(degree), [reference], energy_eV)


def span_report(intensity: torch.Tensor, derivative: torch.Tensor, basis: torch.Tensor) -> dict:
    """The fraction of each reflection's ``derivative`` (H, C) outside the span of ``basis``'s
    rows (K, C): median and 90th percentile, and the fraction of the Poisson information
    sum intensity * derivative^2 left by the projection (``intensity`` (H, C))."""
    projection = basis.T @ torch.linalg.pinv(basis @ basis.T) @ basis
    residual = derivative - derivative @ projection
    outside = residual.norm(dim=-1) / derivative.norm(dim=-1).clamp(min=1e-300)
    left = float((intensity * residual**2).sum() / (intensity * derivative**2).sum())
    return {"weights_per_reflection": basis.shape[0], "outside_median": round(float(outside.median()), 5),
            "outside_p90": round(float(outside.quantile(0.9)), 5), "information_left": round(left, 6),
            "sigma_ratio": round(left**-0.5, 2) if left > 0 else None}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="rubredoxin")
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--site", type=int, default=0, help="the site whose edge shift is leaked")
    ap.add_argument("--bases", default="poly2,poly6,edge0,edge1,edge3")
    ap.add_argument("--at-shift", type=float, default=0.0, help="the site's edge shift (eV) where the signal is taken; the basis stays at 0")
    args = ap.parse_args(argv)
    from refine import load_case

    try:
        bases = args.bases.split(",")
        for name in bases:
            _parse_basis(name)
        case = load_case(args.case, Path(args.data))
        energy = case["energy"].double()
        reference = case["references"][args.site]
        intensity, derivative = log_intensity_derivative(case["table"], args.site, reference, energy, shift_eV=args.at_shift)
        kept = torch.isfinite(derivative).all(-1) & (intensity.min(-1).values > 1.0)
        out = {"case": args.case, "site": case["labels"][args.site], "at_shift_eV": args.at_shift, "channels": energy.numel(),
               "reflections": int(kept.sum()), "median_max_derivative_per_eV": round(float(derivative[kept].abs().amax(-1).median()), 5),
               "bases": {b: span_report(intensity[kept], derivative[kept], basis_named(b, reference, energy)) for b in bases}}  # fmt: skip
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"Sorry: {e}") from None
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
