"""Studies beyond the paper (noise curve, the difference loss during pretraining). Imports report and below."""
