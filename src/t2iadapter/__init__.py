"""T2I-Adapter."""
