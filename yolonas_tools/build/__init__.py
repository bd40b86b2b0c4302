"""Making what a server loads: archives, each backend's files, ONNX export, official weights, model summaries."""
