"""Processing results (dials.stills_process) compared with the simulation's ground truth."""
