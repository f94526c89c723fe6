"""Where ids come from: the input formats, and validation and de-duplication of each id."""
