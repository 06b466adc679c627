"""nmtserve's serving side: the bundle in ONNX Runtime, the continuous-batching decode loop, the gRPC service and its
metrics. No torch."""
