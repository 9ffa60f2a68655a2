"""The shapes every stage shares: spans and traces, the projection, signals and their writers,
errors, and reserved names. Imports nothing of the project."""
