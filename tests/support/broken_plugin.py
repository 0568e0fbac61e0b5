"""A plugin whose import fails, as a user's module with a bug in it would."""

raise RuntimeError("broken_plugin fails as it is imported")
