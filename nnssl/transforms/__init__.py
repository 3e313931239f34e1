"""Pure functions f(x, ..., rng) -> (x_out, aux): masking, fusion, shuffling, rotation, cutout."""
