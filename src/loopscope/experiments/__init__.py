"""Experiments: pipelines that run models (analyze, compare, grid, train, extrapolate, reproduce), call the
analyses and hand their tables to the report."""
