"""Mixed precision, AMP and numerical-robustness tests (DESIGN §4–§5)."""
