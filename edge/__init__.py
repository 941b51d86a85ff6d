"""The edge agent: onnxruntime inference, torch fine-tuning, selective uploads."""
