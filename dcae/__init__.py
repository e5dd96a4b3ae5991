"""DC-AE models, diffusion models and the trainer, built on the dcae_kernels ops."""
