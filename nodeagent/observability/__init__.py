"""Logs, metrics, health and the small HTTP server that serves them."""
