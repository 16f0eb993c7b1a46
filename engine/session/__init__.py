"""What a session keeps on disk: the folder, manifest, events and lock (store)."""
