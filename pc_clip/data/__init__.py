"""The paper's data sets in their official on-disk layouts, with their official checksums, and the world as a data set. Imports core and world."""
