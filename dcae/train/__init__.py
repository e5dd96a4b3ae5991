"""DC-AE training: discriminator, losses, EMA, learning-rate schedules and crash-safe checkpoints."""
