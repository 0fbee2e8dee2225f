"""Finding files: watching and scanning `transfer/`, routes, readiness, and the
bounded intake between discovery and the claimer."""
