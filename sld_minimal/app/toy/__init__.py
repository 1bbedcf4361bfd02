"""A small trained text-to-image world in which SLD's effect can be seen and measured (`world.py`, `train.py`)."""
