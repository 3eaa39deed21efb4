"""Running the scan on Dask: the graph of tasks (:mod:`~engine.cluster.graph`), what a worker receives and keeps
(:mod:`~engine.cluster.worker`), where the tasks run (:mod:`~engine.cluster.runners`: the synchronous scheduler,
the default LocalCluster, an external scheduler) and the shared-memory hand-off of large results from same-host
workers (:mod:`~engine.cluster.handoff`)."""
