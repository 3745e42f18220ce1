"""crystal_transfer: CGCNN transfer learning and frozen-feature (AtomSets-style) models for crystals.

Each pipeline stage is a subcommand of ``python -m crystal_transfer``; the Snakemake workflow calls them.
"""

__version__ = "0.1.0"
