"""The OpenAI-compatible HTTP server behind `scaleinfer serve` (see app.py for the routes)."""
