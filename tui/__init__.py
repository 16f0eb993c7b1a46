"""adaprune's user interfaces: the Typer CLI (and, later, the Textual app)."""
