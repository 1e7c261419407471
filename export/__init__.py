"""Export of torch query/gallery models to ONNX, CoreML and TFLite, with parity checks and the bundle manifest."""
