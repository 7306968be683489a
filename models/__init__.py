"""Model functions: each a Pyro program p(x, z) following the data-plate convention.

Every model takes its data and the keyword ``num_data`` (see ``vi_toolkit.plates``).
"""
