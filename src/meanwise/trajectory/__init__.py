"""Trajectory prediction: ETH/UCY data, Social-Implicit, and distribution-aware metrics."""
