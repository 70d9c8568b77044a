"""The data layer: datasets in memory, client partitions, structured inputs and tasks.

Sits on :mod:`hessrank.io` only; the curvature operators, the trainer and the analysis read
data, split it and feed it to models through here (``load_dataset``, ``make_partition``,
:class:`~hessrank.data.task.Task`).
"""
