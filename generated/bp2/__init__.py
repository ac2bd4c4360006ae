"""betterproto2 dataclass messages of the flowfabric.v1 protos. Generated; do not edit."""
