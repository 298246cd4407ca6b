"""Training and evaluation scripts of the reference models (run as ``python -m training.<script>``)."""
