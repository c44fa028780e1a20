"""Running the model: the PyTorch and ONNX Runtime encoders, the corpus embedding job, speed benchmarks."""
