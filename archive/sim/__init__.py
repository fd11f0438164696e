"""Survey simulator with truth tables."""
