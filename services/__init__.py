"""The platform's services (auth, inference, gateway) and their shared chassis (common)."""
