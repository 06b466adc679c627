"""nmtserve's training side: the Transformer, the corpus, training, evaluation, plots and ONNX export."""
