"""Dataset evaluation runs: where cases come from, the queue job that runs them, and the
JSON, CSV and HTML forms of their results."""
