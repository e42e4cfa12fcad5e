"""mu0_core."""
