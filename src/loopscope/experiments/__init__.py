"""Experiments that produce models or data: training looped models from scratch (`train`)."""
