"""Input/output: raw image readers, atomic writes and the HDF5 case format."""
