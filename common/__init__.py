"""The core every DPPO script loads: tasks, env wrappers and the evaluation, the normaliser, network blocks, the run
plumbing. Simulators (`sims/`), data loaders (`loaders/`) and the robot (`hardware/`) live apart; see README "Layout".
Algorithm logic (sampling, log-probs, losses, buffers) never lives here.
"""
