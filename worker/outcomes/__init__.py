"""Where outcomes go: the structured events and the journal that fans them out."""
