"""From a distilled student to files that ship, measured.

    prune.py     zeroed weights (global magnitude) or removed channels (Torch-Pruning)
    export.py    ONNX through torch.export, checked in onnxruntime
    quantize.py  int8 with onnxruntime's tools: static (calibrated) and dynamic
    bundle.py    the deployable folder: weights, model.json (architecture, preprocessing, classes), ONNX
    timing.py    median and 90th-percentile latency, PyTorch and onnxruntime side by side
    compress.py  `kdistill compress`: the steps above in order, each fine-tuned through the one loop
    frontier.py  its report: the table, the accuracy-latency-size frontier, the headline
    predict.py   `kdistill predict`: a folder's top classes for image files or .npy batches
"""
