"""Every side effect a workflow needs, grouped by what it touches."""
