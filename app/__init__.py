"""Backprop's web app (Reflex): thin pages over the engine in `training/`."""
