"""Config and profiles, paths, seeds, devices, logging, atomic writes, locks, keyed stores, the results table and the model registry. Imports nothing from pc_clip outside core."""
