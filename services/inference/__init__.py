"""The inference service: the Open Inference Protocol over a supervised pool of model workers.

Import from the modules (``services.inference.app``, ``.settings``): worker processes import
this package too, and must not pay for the gRPC server's imports.
"""

__all__: list[str] = []
