"""Scans in and out, geometry, plans, the cache, sampling, augmentation, the pipeline."""
