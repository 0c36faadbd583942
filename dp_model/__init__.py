"""Deep Pneumonia: networks, losses, datasets, synthetic phantoms and training."""
