"""The edit ledger: append-only SQL history of jobs, edits and model versions, plus the
content-addressed store of patch blobs."""
