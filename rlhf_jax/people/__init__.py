"""Labels: the label store (SQLite, append-only) and the labelers that write it (a person in
the terminal, a simulated annotator, a Python function)."""
