"""How the book shows results: its figure style, tables and notebook helpers."""
