"""Data: sources, structure parsing, labels, the canonical crystal table and splits."""
