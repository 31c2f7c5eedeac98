"""Stand-ins and fixtures in the real on-disk layouts (a leaf: imported only by the CLI's paper-smoke path, bench and tests). Imports any stage; no stage imports it."""
