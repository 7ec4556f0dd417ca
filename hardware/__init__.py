"""The robot hardware interface for `deploy_franka.py` (`robot.py`): it imports only `common.errors` and
`common.rotations`, never the simulators or the run plumbing."""
