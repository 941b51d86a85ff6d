"""Command line, one-machine fleet, board bundles and benchmarks."""
