"""tokenlake.probes."""
