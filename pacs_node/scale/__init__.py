"""The scale-out mode's storage: several node processes, on one machine or several, over one
PostgreSQL (docs/decisions.md, "Scale-out on PostgreSQL"). On the ground floor: it knows
tables and connections, not DICOM or the node's steps.

* :mod:`pacs_node.scale.db`: a connection that commits durably, is bounded in time and opens
  again after a break;
* :mod:`pacs_node.scale.queue`: the shared, durable intake: a receiver commits each image
  before it answers the C-STORE, and any worker takes images from it under a lease that
  lapses when the worker dies;
* :mod:`pacs_node.scale.ledger`: which node sends which result, and what each destination has.

The node's side of the mode, the spool over the queue, is :mod:`pacs_node.intake.shared`.
"""
