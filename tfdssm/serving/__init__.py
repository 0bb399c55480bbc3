"""A model server speaking TF Serving's gRPC and REST APIs (``tfdssm serve``).

Modules: :mod:`~tfdssm.export.serving_config` (``models.config``), :mod:`.models`
(loading, version polling, status), :mod:`.predict` (request validation and
execution), :mod:`.batching` (merging concurrent requests), :mod:`.metrics`
(Prometheus), :mod:`.config_files` (TF Serving's batching and monitoring
files), :mod:`.grpc_server`, :mod:`.rest` and :mod:`.server` (the entry point).
Importing this package loads none of them.
"""
