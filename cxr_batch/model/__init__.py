"""The network, its checkpoints, which model a command uses, and the CAM maths. Importing this package imports no torch (cam.py is numpy only)."""
