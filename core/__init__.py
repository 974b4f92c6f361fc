"""What every room shares: settings, database, tables, definition models, durations, errors."""
