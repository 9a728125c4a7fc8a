"""Datasets and the Lightning DataModules that feed training."""
