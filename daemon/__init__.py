"""codelm.daemon: the long-running completion service (imports nothing heavy)."""
