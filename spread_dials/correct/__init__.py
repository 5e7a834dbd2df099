"""dials.spread_correct: a learned, guarded correction of the physics model on top of
dials.spread_refine's engine (:mod:`spread_dials.refine`), whose pieces it imports."""
