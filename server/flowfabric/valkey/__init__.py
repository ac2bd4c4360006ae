"""The Valkey layer: connections, the Functions library, keys, ids, the codec, the error table,
the function declarations, and the reads and records that turn stored values into messages.

Everything that knows a key or a reply shape lives here. It imports nothing from the engine or
the API (see docs/architecture.md, "Layers").
"""
