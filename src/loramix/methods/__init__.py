"""Method pipelines built from the parts: which adapters each method injects and how it routes."""
