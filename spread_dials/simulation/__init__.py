"""dials.spread_simulate as a library: per-shot planning, the shared run setup, one shot, truth
files and the run loop (resume, MPI striping, progress)."""

from spread_dials.simulation.plan import (
    ShotPlan,
    ShotSeeds,
    container_shots,
    n_containers,
    shot_seeds,
    uniform_rotation,
)

__all__ = ["ShotPlan", "ShotSeeds", "container_shots", "n_containers", "shot_seeds", "uniform_rotation"]
