"""Pairs of images, LLM backends (in-process 4-bit, OpenAI-compatible server), parsing, resumable stores of difference records, the judge. Imports core, world, data, models."""
