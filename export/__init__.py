"""Model zoo, data, structured pruning, ONNX export, int8 quantization and the int8->torch bridge."""
