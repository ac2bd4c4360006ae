"""The gRPC server: configuration, Valkey store, servicers and boot."""
