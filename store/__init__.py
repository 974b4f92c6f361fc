"""Every SQL statement, one module per concern; functions take keyword-only arguments."""
