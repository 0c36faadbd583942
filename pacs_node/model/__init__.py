"""The model as the node runs it: a bundle in, one :class:`~pacs_node.model.prediction.Prediction`
per image out (probabilities, the contract's decision, regions earned on held-out data).
"""
