"""Results: one writer per output kind (SR, SC overlay, GSPS, the FHIR worklist message), each
building a :class:`~pacs_node.results.base.Result` from the same context, and the identity (UIDs,
series, equipment) they share. A new output kind is a new writer and one registry line.
"""
