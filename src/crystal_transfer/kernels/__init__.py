"""Native C kernels: the gated convolution's edge loops and the neighbour search, compiled on first use."""
