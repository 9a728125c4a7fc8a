"""Lightning callbacks: sample images during training."""
