"""`make bench` / `python -m bench [--quick]`: the figure job measured for real (see bench/suite.py).

Not part of `make test`. Figures go to bench/out/results.json and bench/out/results.md.
"""
