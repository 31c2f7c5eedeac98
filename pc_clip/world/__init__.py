"""The Shapes world: species, renderer, captions, splits, the oracle that writes true differences, controlled edits. Imports core only."""
