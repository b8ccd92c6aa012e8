"""Models: a bundle (denoiser, scheduler, VAE, classes), loading it from a source, quantized bundles on disk,
sampling, and the bundled assets and data set."""
