"""Handwritten-digit classification on scikit-learn's bundled 8x8 digits (no download)."""
