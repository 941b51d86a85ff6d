"""The coordinator: rounds, selection, aggregation, evaluation, checkpoints."""
