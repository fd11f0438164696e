"""Sky geometry: HEALPix indexing, regions to index ranges, sky tiles. Pure."""
