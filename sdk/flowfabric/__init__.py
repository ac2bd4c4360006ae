"""FlowFabric: a durable execution control plane on gRPC and Valkey Functions."""
