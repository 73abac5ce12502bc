"""exo appliance: run one language model across many small machines."""
__version__ = "0.1.0"
