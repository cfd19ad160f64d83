"""Input and output at the edges of ztfpsf: FITS images, ZTF names and masks,
catalogues, result files, alert packets. Nothing here is numerical."""
