"""The API layer: interceptors, limits, fence decoding, servicers, watches and stream RPCs.

Servicers decode a request, call the engine or one Valkey Function, and encode the reply. The
API imports the engine and the Valkey layer, never the other way round (docs/architecture.md).
"""
