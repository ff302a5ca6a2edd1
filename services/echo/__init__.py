"""echo service."""
