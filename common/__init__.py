"""Shared plumbing for the DPPO scripts: tasks, env wrappers, datasets, network blocks.

Algorithm logic (sampling, log-probs, losses, buffers) never lives here; see README "Layout".
"""
