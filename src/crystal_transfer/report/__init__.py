"""The report: tables, figures and the study's published values."""
