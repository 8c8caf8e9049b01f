"""fxshift's native kernels: the library search (libraries), the cffi loader (native), the packed
weight format (packing) and the torch.library ops fxshift::shift_conv2d / shift_linear (shift_ops)."""
