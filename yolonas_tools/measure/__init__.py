"""Measuring: speed (bench, load, soak, the peer), accuracy (evaluation, reduced precision) and what draft decoding
changes."""
