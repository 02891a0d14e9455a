"""Training jobs for the parts a unified model is built from (and for the evaluation reader)."""
