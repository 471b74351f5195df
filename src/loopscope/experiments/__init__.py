"""Experiments: pipelines that run models, call the analyses and hand their tables to the report."""
