"""``merit compare``: the paper's table with its controls (paper §5)."""
