"""One module per command; each exposes ``main(args, settings) -> exit code``."""
