"""Flow Contrastive Estimation of energy-based models on 2-D data."""
