"""tokenlake.analyze."""
