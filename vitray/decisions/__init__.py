"""A line's decision per part: OK, NG or REVIEW at the error rates its quality engineer chooses.

`calibration` makes a model's scores calibrated chances and sets the two thresholds with a
finite-sample bound; `ood` flags images unlike any the model was calibrated on; `drift`
compares a night's images with the calibration's; `policy` holds what travels with the model
and turns one image's numbers into its decision and reason.
"""
