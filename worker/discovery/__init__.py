"""Choosing what to delete: discovery filters, sealed plans, and protection re-checks."""
