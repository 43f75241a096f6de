"""The Ray bridge: an ALPCRUN.CH worker whose compute is a pool of Ray actors.

``python -m ray_alpcrun.bridge --help`` for the command line; from Python use
:func:`ray_alpcrun.bridge.launch.start_bridge`.
"""
