"""Delivery: one durable outbox per destination, a sender thread each, and the transports
(C-STORE, STOW-RS, FHIR) that carry results; a result is a file and its sidecar, whatever its kind.
"""
