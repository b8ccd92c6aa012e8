"""Salience: per-channel activation and weight statistics collected across timesteps, the per-channel
quantization error, and the measures derived from them."""
