"""The Ray edge: one driver module per job, worker code in modules of its own."""
