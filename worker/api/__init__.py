"""Talking to the DevServer jobs API: sign, send, classify; keys and the HTTP session."""
