"""nmtserve's serving side: the bundle in ONNX Runtime, step-level decoding, and (soon) the gRPC service. No torch."""
