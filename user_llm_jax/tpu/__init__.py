"""Cloud TPU from any host: slice topologies and ahead-of-time compile checks."""
