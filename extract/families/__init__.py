"""The model families tokenlake extracts from: one module each, registered when imported.

Every module here calls `tokenlake.extract._registry.register(Family(...))`; the registry imports
them all the first time a family is looked up. Adding a family is a new module here plus its tests.
"""
