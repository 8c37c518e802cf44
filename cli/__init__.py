"""tokenlake.cli: the command line and the experiment runner."""
