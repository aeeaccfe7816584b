"""The scaling-law sweep: grid.py (budgets x depths -> checked cells), fit.py (isoFLOP
parabolas and power laws, numpy only), plots.py (the charts)."""
