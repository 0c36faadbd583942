"""The scale-out mode: several node processes, on one machine or several, over one PostgreSQL.

:mod:`pacs_node.scale.queue` is the shared, durable intake: a receiver commits each image to
PostgreSQL before it answers the C-STORE, and any worker takes images from it under a lease
that lapses when the worker dies (docs/decisions.md, "Scale-out on PostgreSQL").
"""
