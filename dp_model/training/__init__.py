"""Training: data resident on the device, stage I (SimCLR), stage II (MGACR, CB focal loss), bundles."""
