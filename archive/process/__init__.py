"""Processing steps: arrays and Exposures in, Exposures and columnar tables out. Never touches the store."""
