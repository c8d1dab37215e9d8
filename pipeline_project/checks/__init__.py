"""Asset checks, grouped by what they guard."""
