"""Data files that ship inside the package (see ``anomalous/NOTICE`` for their licence).

``anomalous/``: the measured f'/f'' pair of P. furiosus rubredoxin, Fe(II) and Fe(III), cut to
7000-7300 eV; :mod:`spread_dials.io.builtin_references` gives their paths.
"""
