"""Intake: what arrives and is kept. The DICOM listener (who may call, what is accepted, every
refusal visible), the durable spool an acknowledged image lives in until its results are
durable (or, in the scale-out mode, the shared queue an image lives in, :mod:`pacs_node.intake.shared`), the screen (frontal chest radiographs only), the sanitizer (tolerant reading of
real sources, the only data set writers see) and the worker's queue.

Intake depends on the ground floor only; nothing here knows the model or the results.
"""
