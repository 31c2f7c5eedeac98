"""Create, save, load and verify open_clip models (full architecture in the checkpoint), encode text, cache image embeddings. Imports core and data."""
