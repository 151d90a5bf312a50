"""Everything written to disk by training: run directories, checkpoints, export."""
