"""Serving a trained model: what the node and a bundle's own configs need, most of it without
PyTorch.

* :mod:`~dp_model.serving.contract`: everything the node needs to know about a model, and the
  one decision rule; :mod:`~dp_model.serving.sources` and :mod:`~dp_model.serving.gate`, the
  map sources' names and the out-of-distribution gate's scores, in NumPy;
* :mod:`~dp_model.serving.loading`, :mod:`~dp_model.serving.bundle`: reading and writing a
  MONAI bundle;
* :mod:`~dp_model.serving.onnx_session`, :mod:`~dp_model.serving.onnx_graph`,
  :mod:`~dp_model.serving.runner`: the ONNX graph, its export, and the one runner of a
  bundle's network; :mod:`~dp_model.serving.quantized`, the graph's 8-bit copy and the
  validation it is kept on; :mod:`~dp_model.serving.inference`, what ``inference.json`` calls;
* :mod:`~dp_model.serving.ood`, :mod:`~dp_model.serving.calibration`,
  :mod:`~dp_model.serving.served`: the gate's detectors, the calibration and operating
  points, and the served decision measured, fitted at training and read when serving.
"""
