"""The Deep Pneumonia DICOM node: receives chest X-rays, returns their results (an SR, an
overlay, a presentation state, a worklist message).

The data path, one folder per step, over a ground floor every step may use::

    intake/     listener -> spool -> screen, sanitize -> work queue
    model/      predictor: a bundle in, a Prediction per image out
    results/    one writer per output kind (SR, SC, GSPS, FHIR) -> Result
    delivery/   outbox per destination -> transports (C-STORE, STOW-RS, FHIR)

    ground:     config, logs, metrics, audit, status, codes, files, uids, charsets, health,
                dimse_reactor (pynetdicom's association loop), scale/ (the scale-out mode's
                storage: a PostgreSQL connection, the shared queue, the delivery ledger)

``node.py`` wires the steps together: ``pipeline.py`` is the worker's path for each image,
``outcomes.py`` the events it emits (the audit trail, metrics, log and ``drift.py``'s watch
subscribe), ``supervisor.py`` keeps the threads alive and answers ``/health``; ``cli.py`` is
``dp-node``. A step imports from the
ground floor and from steps before it, never from a step after it (tests/test_layers.py).
"""
