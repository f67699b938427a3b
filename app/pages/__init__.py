"""Layout only: each page arranges components bound to its state."""
