"""Evaluation of trained models: bits/dim, FID/IS with their feature networks, the paper's figures."""
