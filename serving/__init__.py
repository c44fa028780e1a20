"""`nomic-moe serve`: an OpenAI- and TEI-compatible embedding endpoint (see app.py for the routes)."""
