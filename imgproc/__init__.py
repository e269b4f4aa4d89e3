"""imgproc: calibration, binning, alignment and stacking of astronomical FITS frames."""

__version__ = "0.1.0"
