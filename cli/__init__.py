"""`nomic-moe`, the one command line of the package (see main.py)."""
