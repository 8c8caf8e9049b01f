"""Pure tensor math of the decompositions: no torch.fx, no modules, tested on tensors alone."""
