"""Hyperparameter search for small vision models: config, data, training loop, Ray Tune sweeps.

Not to be confused with Ray's `ray.tune`, which this package uses under that full name.
"""
