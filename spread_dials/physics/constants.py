"""Physical constants used by the forward model (SI or crystallographic units as named)."""

from __future__ import annotations

__all__ = ["R_E_SQ_M2", "HC_EV_A", "AVOGADRO"]

#: Thomson cross-section prefactor r_e^2 (m^2), the value nanoBragg uses.
R_E_SQ_M2: float = 7.94079248018965e-30
#: h*c in eV*A: wavelength_A = HC_EV_A / energy_eV.
HC_EV_A: float = 12398.419843320026
#: Avogadro's number (1/mol).
AVOGADRO: float = 6.02214076e23
