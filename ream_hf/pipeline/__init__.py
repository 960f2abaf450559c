"""Running the method over a model: calibration data, the layer runner, streaming (skeleton, layer loader,
hidden-state store, work folder), the MTP block, and one MoE layer's compression from statistics to surgery."""
