"""Shared network blocks (window attention, large-kernel attention, patch merge/expand)."""
