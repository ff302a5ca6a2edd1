"""fusion service."""
