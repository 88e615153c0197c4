"""Scoring a trained run: metrics, reports, comparisons, and pictures of results."""
