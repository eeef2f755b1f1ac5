"""Physiological recordings and RETROICOR regressors."""
