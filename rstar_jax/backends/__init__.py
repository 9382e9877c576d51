"""Backend-specific tuning, each module active only on its backend (the plain path runs everywhere else)."""
