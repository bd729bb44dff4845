"""neurocl: contrastive analysis of brain MRI cohorts.

Learns what all subjects share (age, sex, site, anatomy) apart from what is
specific to patients (salient patterns), from a BIDS-style cohort of 3D images.
"""

__version__ = "0.1.0"
