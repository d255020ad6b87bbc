"""Several SAEs trained in one process from one activation stream (a group)."""
