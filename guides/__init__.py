"""Guide functions: variational families q(z | x) matching the models in ``models``."""
