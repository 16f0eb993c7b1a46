"""Text: calibration and evaluation sources, token windows, and text sampled from the model itself."""
