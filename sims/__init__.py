"""The environments we ship or adapt (Avoid, robomimic, Furniture-Bench), evaluation videos and the Avoid picture.

Each is imported only when a task of its suite is made (`common.envs.make_vec_env`) or its feature is asked for
(`--capture-video`, the Avoid `trajectories.png`); a copy of a script needs only the files of the suites it runs.
"""
